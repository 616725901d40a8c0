"""Shoal's benchmark suite in one command: every bench script, one JSON file of figures, plots.

    .venv/bin/python bench/run.py --quick           # minutes: small sizes, fewer runs
    .venv/bin/python bench/run.py                   # the published figures (an hour or more)
    .venv/bin/python bench/run.py --scale           # + the scale curve at 100k, 1M and 5M documents
    .venv/bin/python bench/run.py --quick --only query_search,scan_rcu
    .venv/bin/python bench/run.py --quick --scale --only none     # only the scale curve, small sizes

Each script runs in its own subprocess of this interpreter with `--json`, so a crash, a
timeout or an out-of-memory kill costs that script only: its error is recorded and the suite
goes on (the exit status is 1 if any failed). Everything a script printed is kept in
`bench/results/<date>/<name>.log`. Everything a run measured goes into
`bench/results/<date>.json` (`<date>-quick` for --quick, so a quick check never overwrites
the published figures), with the machine it ran on (cores, RAM, Python, package versions,
load average at the start and the end, commit) and each script's command, wall time, peak
RSS and load average; the plots go beside the logs in `bench/results/<date>/` as PNG files.
A second run on the same day (say `--only sync_lag`) replaces the figures of the scripts it
ran and keeps the others'.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PACKAGES = ["shoal", "pyarrow", "datafusion", "tantivy", "duckdb", "orjson", "numpy", "sqlglot", "aiohttp",
            "aiobotocore", "boto3", "moto", "matplotlib"]

# Arguments per script: (quick, full). The full ones are each script's published defaults.
SUITE = {
    "scan_rcu": (["--runs", "1", "--items", "3000"], []),
    "query_search": (["--quick"], []),
    "apply_throughput": (["--quick"], []),
    "export_ingest": (["--items", "50000", "--runs", "1"], []),
    "sync_lag": (["--quick"], []),
}
SCALE_SIZES = {"quick": [10_000, 30_000, 100_000], "full": [100_000, 1_000_000, 5_000_000]}
# apply_throughput holds every stream record (new and old image) as Python dicts, some KB
# each: at 5M that is tens of GiB, more than the machine has, so its curve stops at 1M.
APPLY_SCALE_LIMIT = 1_000_000


def machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH,
                           capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1),
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "commit": commit + ("+uncommitted changes" if dirty else ""),
    }


def run_script(name: str, arguments: list[str], out: Path, timeout_s: float | None, label: str | None = None) -> dict:
    """Run bench/<name>.py with `--json`; its figures, or the error that stopped it. Its
    output goes to <out>/<label>.log (label: the name unless told)."""
    figures_path = out / f"{label or name}.json"
    log_path = out / f"{label or name}.log"
    command = [sys.executable, str(BENCH / f"{name}.py"), *arguments, "--json", str(figures_path)]
    figures_path.unlink(missing_ok=True)
    print(f"\n== {name} {' '.join(arguments)}  (log: {log_path})", flush=True)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with log_path.open("wb") as log:
        # Its own process group: on a timeout, the moto and Shoal servers it started go too.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    waited: dict = {}
    # os.wait4 gives this child's own peak RSS (and that of what it waited for, e.g. its loads).
    waiter = threading.Thread(target=lambda: waited.update(zip(("pid", "status", "usage"), os.wait4(process.pid, 0))))
    waiter.start()
    waiter.join(timeout_s)
    timed_out = waiter.is_alive()
    if timed_out:
        os.killpg(process.pid, signal.SIGKILL)
        waiter.join()
    process.returncode = os.waitstatus_to_exitcode(waited["status"])  # reaped above: Popen must not wait again
    result = {"command": command[1:], "seconds": round(time.monotonic() - started, 1),
              "load_average_1min": [load_before, os.getloadavg()[0]],  # at its start and its end
              "peak_rss_bytes": waited["usage"].ru_maxrss * 1024, "exit_code": process.returncode}
    lines = log_path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-22:]), flush=True)
    if timed_out or process.returncode != 0 or not figures_path.exists():
        reason = f"timed out after {timeout_s:g} s" if timed_out else f"exit code {process.returncode}"
        result["error"] = reason + ": " + "\n".join(lines[-15:])
        print(f"!! {name} failed ({reason}); the suite goes on", flush=True)
    else:
        result["figures"] = json.loads(figures_path.read_text())
        figures_path.unlink()  # it is in the combined file now
    return result


# --------------------------------------------------------------------------- plots


def plot_sync_lag(figures: dict, path: Path) -> None:
    """Lag of each write request over the phase, one panel per rate: Shoal through moto, the bare
    stream poller on moto, and Shoal through the streams double."""
    phases = figures["phases"]
    fig, axes = plt.subplots(len(phases), 1, figsize=(9, 2.8 * len(phases)), squeeze=False, sharex=True)
    for ax, phase in zip(axes[:, 0], phases):
        for key, label, colour in (("shoal", "Shoal through moto (write ack → visible in SQL)", "tab:blue"),
                                   ("baseline", "baseline (write ack → GetRecords)", "tab:grey"),
                                   ("double", "Shoal through the streams double (record filed → visible)", "tab:green")):
            series = phase[key][0]["series"]  # the first run
            ax.plot([t for t, _ in series], [lag for _, lag in series], ".", ms=2, color=colour, label=label)
        ax.set_title(f"{phase['rate']:,} changes/s asked", fontsize=10)
        ax.set_ylabel("lag (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, markerscale=4)
    axes[-1, 0].set_xlabel("seconds since the phase started (first second: warm-up)")
    fig.suptitle("Sync lag per write over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ingest(scan: dict | None, export: dict | None, path: Path) -> None:
    """Left: bulk export load rate over time (and its parse-only floor). Right: RCU the
    throttling proxy metered per second of each scan, against the budget and the table."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    if export:
        for size in export["sizes"]:
            progress = size["loads"][0]["progress"]
            times = [0.0] + [t for t, _ in progress]
            counts = [0] + [n for _, n in progress]
            rates = [(b - a) / max(tb - ta, 1e-6) for a, b, ta, tb in zip(counts, counts[1:], times, times[1:])]
            steps = left.stairs(rates, times, label=f"load, {size['items']:,} items")
            left.axhline(size["floor_items_per_s"], ls=":", color=steps.get_edgecolor(),
                         label=f"floor (gunzip + orjson), {size['items']:,}")
        left.set_yscale("log")
    left.set_title("Bulk export ingest rate over time", fontsize=10)
    left.set_xlabel("seconds since the load started")
    left.set_ylabel("items/s (per applied batch)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    if scan:
        budget = scan["budget_rcu"]
        for scenario, style in zip(scan["scenarios"], ("-", "--")):
            capacity = scenario["capacity_rcu"]
            for key, label, colour in (("shoal_rcu_per_s", "Shoal", "tab:blue"),
                                       ("naive_duckdb_rcu_per_s", "naive boto3 → DuckDB", "tab:orange")):
                per_second = scenario[key][0]
                right.plot(range(len(per_second)), per_second, style, color=colour, drawstyle="steps-post",
                           label=f"{label}, table {capacity} RCU/s")
        right.axhline(budget, color="black", lw=1, label=f"budget {budget} RCU/s")
        right.set_title("Bulk scan: RCU consumed per second vs budget", fontsize=10)
    right.set_xlabel("seconds since the scan's first request (the last second is partial)")
    right.set_ylabel("RCU/s (throttling proxy's meter)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_query_latency(figures: dict, path: Path) -> None:
    """Per query, the distribution of every sample through the API beside each in-process baseline."""
    samples = figures["samples_ms"]
    colours = {"api_ms": "tab:blue", "engine_ms": "tab:cyan", "tantivy_ms": "tab:green", "datafusion_ms": "tab:orange",
               "duckdb_ms": "tab:red"}
    labels = {"api_ms": "Shoal HTTP API", "engine_ms": "Shoal engine alone (server-side)", "tantivy_ms": "tantivy in-process",
              "datafusion_ms": "DataFusion in-process", "duckdb_ms": "DuckDB (copy) in-process"}
    fig, ax = plt.subplots(figsize=(10, 0.75 * sum(len(s) for s in samples.values()) + 1.5))
    position, ticks, names = 0, [], []
    for query, by_engine in reversed(list(samples.items())):
        for engine, values in by_engine.items():
            box = ax.boxplot(values, positions=[position], orientation="horizontal", widths=0.6, patch_artist=True,
                             showfliers=True, flierprops={"markersize": 2})
            box["boxes"][0].set_facecolor(colours[engine])
            ticks.append(position)
            names.append(f"{query} · {labels[engine]}")
            position += 1
        position += 0.6
    ax.set_yticks(ticks, names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_title(f"Query latency, {figures['documents']:,} documents, {figures['repeat']} samples each")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(scale: list[dict], path: Path) -> None:
    """How cost grows with the number of documents: query p50s, ingest rates, memory."""
    fig, (queries, ingest, memory) = plt.subplots(1, 3, figsize=(15, 4.5))
    queries.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per query: there are more than 10
    query_runs = [(r["size"], r["figures"]) for r in scale if r["script"] == "query_search" and "figures" in r]
    for name in ([q["query"] for q in query_runs[0][1]["queries"] if q["baseline"] != "DuckDB (copy)"]
                 if query_runs else []):
        points = [(size, next(q["api_p50_ms"] for q in f["queries"] if q["query"] == name)) for size, f in query_runs]
        queries.plot(*zip(*points), "o-", label=name)
    queries.set_title("Query p50 through the API", fontsize=10)
    queries.set_ylabel("ms")
    for script, key, label in (("query_search", "apply_docs_per_s", "apply (query bench's build)"),
                               ("export_ingest", "load_items_per_s", "export load"),
                               ("apply_throughput", "changes_per_s", "stream decode + apply, 10k batches")):
        points = []
        for r in scale:
            if r["script"] != script or "figures" not in r:
                continue
            f = r["figures"]
            if script == "export_ingest":
                f = f["sizes"][0]
            elif script == "apply_throughput":
                f = next(row for row in f["rows"] if "10,000" in row["path"])
            points.append((r["size"], f[key]))
        if points:
            ingest.plot(*zip(*points), "o-", label=label)
    ingest.set_title("Ingest rate", fontsize=10)
    ingest.set_ylabel("documents/s")
    for script, label in (("query_search", "query bench (data + Arrow + DuckDB copy)"),
                          ("export_ingest", "export load (its own process)"),
                          ("apply_throughput", "stream apply bench (holds every record)")):
        points = []
        for r in scale:
            if r["script"] == script and "figures" in r:
                rss = r["figures"]["sizes"][0]["peak_rss_bytes"] if script == "export_ingest" else r["peak_rss_bytes"]
                points.append((r["size"], rss / 2**20))
        if points:
            memory.plot(*zip(*points), "o-", label=label)
    memory.set_title("Peak RSS", fontsize=10)
    memory.set_ylabel("MiB")
    for ax in (queries, ingest, memory):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("documents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounded(value):
    """`value` with every float to 5 significant digits: the samples are noisier than that,
    and the results file shrinks to half."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    return value


def plot_all(results: dict, out: Path) -> list[str]:
    """Every plot whose figures exist; a plot that fails is reported, the others still drawn."""
    figures = {name: r.get("figures") for name, r in results["benches"].items()}
    plots = {
        "sync_lag.png": (plot_sync_lag, figures.get("sync_lag")),
        "ingest_and_scan_rcu.png": (lambda p: plot_ingest(figures.get("scan_rcu"), figures.get("export_ingest"), p),
                                    figures.get("scan_rcu") or figures.get("export_ingest")),
        "query_latency.png": (plot_query_latency, figures.get("query_search")),
        "scale.png": (plot_scale, results.get("scale")),
    }
    written = []
    for filename, (draw, data) in plots.items():
        if not data:
            continue
        try:
            if filename == "ingest_and_scan_rcu.png":
                draw(out / filename)
            else:
                draw(data, out / filename)
            written.append(str(out / filename))
        except Exception as error:  # noqa: BLE001 - one broken plot must not lose the others or the figures
            results.setdefault("plot_errors", {})[filename] = repr(error)
            print(f"!! plot {filename}: {error!r}", flush=True)
    return written


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer runs: a few minutes")
    parser.add_argument("--scale", action="store_true",
                        help="also run the query, export and apply benches at growing sizes "
                             "(100k, 1M, 5M documents; 10k, 30k, 100k with --quick)")
    parser.add_argument("--scale-sizes", type=lambda text: [int(n) for n in text.split(",")],
                        help="document counts of the scale curve, comma-separated")
    parser.add_argument("--only", type=lambda text: text.split(","),
                        help=f"comma-separated scripts to run, of {', '.join(SUITE)} ('none': only the scale curve)")
    parser.add_argument("--timeout", type=float, help="seconds per script before it is killed "
                                                      "(default 1,800 with --quick, none otherwise)")
    args = parser.parse_args()
    unknown = set(args.only or []) - set(SUITE) - {"none"}
    if unknown:
        parser.error(f"--only: no script {', '.join(sorted(unknown))}")
    mode = "quick" if args.quick else "full"
    timeout_s = args.timeout or (1800 if args.quick else None)
    date = dt.date.today().isoformat() + ("-quick" if args.quick else "")
    out = RESULTS / date
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": dt.datetime.now().isoformat(timespec="seconds"), "mode": mode,
               "machine": machine(), "load_average_start": os.getloadavg(), "benches": {}}
    print(f"Shoal bench suite, {mode} mode; {results['machine']['cores']} cores, {results['machine']['ram_gib']} GiB, "
          f"load average {results['load_average_start'][0]:.1f}; results in {out}", flush=True)

    for name, (quick, full) in SUITE.items():
        if args.only and name not in args.only:
            continue
        results["benches"][name] = run_script(name, quick if args.quick else full, out, timeout_s)

    if args.scale:
        results["scale"] = []
        for size in args.scale_sizes or SCALE_SIZES[mode]:
            runs = [("query_search", ["--docs", str(size)]),
                    ("export_ingest", ["--items", str(size), "--runs", "1"])]
            if size <= APPLY_SCALE_LIMIT:
                runs.append(("apply_throughput", ["--records", str(size), "--runs", "1", "--no-scan"]))
            for name, arguments in runs:
                result = run_script(name, arguments, out, timeout_s, label=f"scale-{size}-{name}")
                results["scale"].append({"script": name, "size": size} | result)

    results["load_average_end"] = os.getloadavg()
    path = RESULTS / f"{date}.json"
    if path.exists():  # an earlier run today: keep the figures of the scripts this one did not run
        earlier = json.loads(path.read_text())
        results["benches"] = earlier.get("benches", {}) | results["benches"]
        results.setdefault("scale", earlier.get("scale"))
    results["plots"] = plot_all(results, out)
    failed = [name for name, r in results["benches"].items() if "error" in r]
    failed += [f"{r['script']} at {r['size']:,}" for r in results.get("scale") or [] if "error" in r]
    results["failed"] = failed
    path.write_text(json.dumps(rounded(results), indent=1))
    print(f"\nfigures: {path}\nplots: {', '.join(results['plots']) or 'none'}\n"
          f"load average {results['load_average_start'][0]:.1f} at the start, {results['load_average_end'][0]:.1f} at the end")
    if failed:
        print(f"FAILED: {', '.join(failed)} (their errors are in {path} and their logs in {out})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
