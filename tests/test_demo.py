"""`shoal demo`, the README's first command: it loads its sample table, answers the example
commands it prints, keeps its API key out of output that is no terminal, and stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

from support import free_port, subprocess_env

BANNER_END = "Press Ctrl+C to stop."
STARTUP_TIMEOUT_S = 150


def _read_lines(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _examples(banner: str) -> list[str]:
    """The curl commands of the banner, each a paragraph's lines from its `curl` on."""
    commands = []
    for paragraph in banner.split("\n\n"):
        lines = paragraph.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("curl ")]
        if starts:
            commands.append("\n".join(lines[starts[0]:]))
    return commands


def test_the_demo_answers_its_own_examples_and_prints_no_key(tmp_path):
    """Into an existing directory open to others (made owner-only), given as a relative path;
    its examples are run from another directory."""
    data_dir = tmp_path / "demo-data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    demo = subprocess.Popen(
        [sys.executable, "-m", "shoal.server.cli", "demo", "--port", str(free_port()),
         "--moto-port", str(free_port()), "--data-dir", "demo-data"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), start_new_session=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    threading.Thread(target=_read_lines, args=(demo.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not any(BANNER_END in line for line in lines):
            assert demo.poll() is None, f"the demo exited with {demo.returncode}:\n{''.join(lines)}"
            assert time.monotonic() < deadline, f"no banner after {STARTUP_TIMEOUT_S} s:\n{''.join(lines)}"
            time.sleep(0.2)
        output = "".join(lines)
        key_file = data_dir / "demo-api-key"
        assert key_file.read_text().strip() not in output
        assert key_file.stat().st_mode & 0o077 == 0 and data_dir.stat().st_mode & 0o077 == 0

        examples = _examples(output)
        assert len(examples) == 3, output
        answers = []
        for command in examples:
            run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, env=subprocess_env(),
                                 cwd=tmp_path.parent)
            assert run.returncode == 0, run.stderr
            answers.append(json.loads(run.stdout))
        collections, by_status, latest = answers
        assert [c["name"] for c in collections["data"]] == ["orders"]
        assert sum(row["n"] for row in by_status["results"]) >= 2000 * 0.9  # the writer deletes a few
        assert len(latest["results"]) == 5
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
    assert code == 0, "".join(lines)
    assert "Stopping the demo" in "".join(lines)
