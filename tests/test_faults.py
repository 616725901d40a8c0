"""Faults: the source endpoint goes away, the disk fills up, the process dies while compacting.

`test_source_endpoint_down_mid_scan_and_mid_stream`: real moto, a real Shoal subprocess. Shoal
reaches moto through `FlakyProxy` (then `ThrottlingProxy`, which paces the scan so it lasts
seconds). moto keeps its state in memory, so restarting moto itself would lose the table;
instead the proxy's listener is closed (connection refused) and its open connections are
aborted (connection reset) for a few seconds, once in the middle of the scan and once while
the stream is followed under writes. Each time the status must show the error, then clear it;
at the end the collection equals the table.

`test_disk_full_during_a_segment_write` (simulated ENOSPC) and
`test_disk_full_on_a_real_small_tmpfs`: a refresh that cannot write its files fails, and
nothing of it is visible (snapshot, manifest, checkpoint, files on disk unchanged); the same
changes applied again later succeed. `test_disk_full_end_to_end`: a Shoal server on a 4 MiB
tmpfs shows the error in the status, keeps retrying, and catches up once the disk has grown.
The tmpfs tests are skipped unless this process may mount one (root with CAP_SYS_ADMIN).

`test_killed_during_compaction`: a child process applies numbered batches to a Collection and
is SIGKILLed in refreshes that compact: at random moments just after a compaction began, and
at exact points (just before the manifest is written; just after it replaced the old one).
Each reopened collection must equal exactly the batches up to its checkpoint.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pytest
from aiohttp import web

from shoal.index import segment as segment_module
from shoal.index.collection import MANIFEST, Change, Collection
from support import Dynamo, LoopbackServer, ShoalProcess, compare_collection, wait_until
from test_crash_safety import Churn, ChurnThread, consistent_scan
from test_walking_skeleton import doc_id, make_item
from throttling_proxy import ThrottlingProxy

# --------------------------------------------------------------------------- source endpoint down


class FlakyProxy(LoopbackServer):
    """A test double for a DynamoDB (+ Streams) endpoint that goes away: it forwards every
    request unchanged to `target_url` (a real endpoint speaking the AWS wire protocol) and
    passes the answer back. `go_down()` closes the listening socket (new connections are
    refused) and aborts every open connection (requests in flight are reset); `come_up()`
    listens again on the same port."""

    name = "flaky proxy"

    def __init__(self, target_url: str) -> None:
        super().__init__()
        self.target_url = target_url.rstrip("/")
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.target_url + request.path_qs,
                                         headers=headers, data=await request.read()) as answer:
            body = await answer.read()
            passed = {k: v for k, v in answer.headers.items()
                      if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=answer.status, body=body, headers=passed)

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()
        self.url = f"http://127.0.0.1:{self.port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            self._session = session
            ready.set()
            await self._stopping.wait()
        await self._runner.cleanup()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _down(self) -> None:
        assert self._runner is not None and self._site is not None
        await self._site.stop()
        for handler in self._runner.server.connections:  # type: ignore[union-attr]
            if handler.transport is not None:
                handler.transport.abort()

    def go_down(self) -> None:
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(10)  # type: ignore[arg-type]

    def come_up(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)  # type: ignore[arg-type]


OUTAGE_S = 4.0


async def test_source_endpoint_down_mid_scan_and_mid_stream(ddb: Dynamo, moto_server: str, table_name: str,
                                                            shoal_unstarted: ShoalProcess):
    seed = random.SystemRandom().randrange(1, 10**9)
    print(f"\nfaults seed {seed}")
    shoal = shoal_unstarted
    ddb.create_table(table_name, pk=("pk", "S"), sk=("sk", "N"))
    loader = Churn(moto_server, table_name, "init", seed)
    initial = [make_item(loader.rng, f"init{i:06d}", str(i % 3 + 1)) for i in range(3000)]
    ddb.batch_write(table_name, initial)
    loader.model.update((doc_id(item), item) for item in initial)
    loader.next_key = len(initial)

    with ThrottlingProxy(moto_server, 150) as pacing, FlakyProxy(pacing.url) as flaky:
        shoal.start()
        await shoal.create_integration("flaky", flaky.url)
        await shoal.create_collection("c", "flaky", table_name, rcu=150)

        async def source() -> dict:
            return (await shoal.get_collection("c"))["sources"][0]

        async def outage(what: str) -> str:
            """Take the endpoint away for OUTAGE_S; the ingest state while the status showed the error."""
            flaky.go_down()
            down_at = time.monotonic()

            async def error_shown():
                src = await source()
                return src["status"]["state"] == "ERROR" and (src["status"]["message"], src["dynamodb"]["current_status"]["state"])

            message, state = await wait_until(error_shown, 30, 0.1, f"the status to show the outage {what}",
                                       describe=lambda: shoal.get_collection("c"))
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            flaky.come_up()

            async def cleared():
                return (await source())["status"]["state"] != "ERROR"

            await wait_until(cleared, 60, 0.2, f"the error to clear after the outage {what}",
                             describe=lambda: shoal.get_collection("c"))
            print(f"outage {what} ({state}): status said {message!r}; cleared {time.monotonic() - down_at:.1f} s after it began")
            return state

        async def scanning():
            src = (await source())["dynamodb"]
            return src["current_status"]["state"] == "SCANNING" and 0 < src["status"]["scan_records_processed"] < 2000

        await wait_until(scanning, 30, 0.05, "the scan to be under way", describe=lambda: shoal.get_collection("c"))
        assert await outage("mid-scan") == "SCANNING", "the outage missed the scan"
        await shoal.wait_ready("c")

        writers = [ChurnThread(loader), ChurnThread(Churn(moto_server, table_name, "w-", seed + 1))]
        for writer in writers:
            writer.start()
        try:
            await wait_until(lambda: _stream_applied(shoal), 30, 0.1, "stream records applied")
            assert await outage("mid-stream") == "PROCESSING_STREAM"
            await asyncio.sleep(1.0)  # writes after the outage, too
        finally:
            for writer in writers:
                writer.finish()

        table = consistent_scan(ddb, table_name)

        async def converged():
            rows = await shoal.query("SELECT * FROM commons.c LIMIT 1000000", limit=1_000_000)
            problems = compare_collection(rows, table)
            assert not problems, f"seed {seed}, {len(rows)} rows, {len(table)} items:\n" + "\n".join(problems)
            return True

        await wait_until(converged, 60, 0.5, "the collection to equal the table", describe=lambda: shoal.get_collection("c"))
        coll = await shoal.get_collection("c")
        assert coll["status"] == "READY" and coll["sources"][0]["status"]["state"] != "ERROR", coll
        assert coll["sources"][0]["status"]["retries"] >= 2, coll


async def _stream_applied(shoal: ShoalProcess) -> bool:
    return (await shoal.get_collection("c"))["sources"][0]["dynamodb"]["status"]["stream_last_processed_at"] is not None


# --------------------------------------------------------------------------- disk full


def _docs(first: int, count: int, tag: str) -> list[Change]:
    return [Change.of(f"d{i}", {"n": i, "tag": tag, "text": f"word{i % 13} " * 20}, 1, {}) for i in range(first, first + count)]


def _state(collection: Collection) -> dict[str, dict]:
    rows = [row for batch in collection.snapshot().batches() for row in batch.to_pylist()]
    by_id = {row["_id"]: {k: row[k] for k in ("n", "tag")} for row in rows}
    assert len(by_id) == len(rows), "duplicate _id in the collection"
    return by_id


def _expected(changes: list[Change]) -> dict[str, dict]:
    model: dict[str, dict] = {}
    for change in changes:
        if change.doc is None:
            model.pop(change.id, None)
        else:
            model[change.id] = {"n": change.doc["n"], "tag": change.doc["tag"]}
    return model


def _manifest(directory: Path) -> bytes | None:
    path = directory / MANIFEST
    return path.read_bytes() if path.exists() else None


def _files(directory: Path) -> set[str]:
    return {path.name for path in directory.glob("seg-*")}


async def test_disk_full_during_a_segment_write(tmp_path: Path, monkeypatch):
    """ENOSPC raised by the segment writer after it wrote half of the first file."""
    collection = Collection.open(tmp_path / "c")
    first = _docs(0, 200, "a")
    await collection.apply(first, {"n": 1})
    manifest, files, state = (tmp_path / "c" / MANIFEST).read_bytes(), _files(tmp_path / "c"), _state(collection)

    real_write_all = segment_module._write_all
    failures = []

    def full_disk(paths: dict[Path, bytes | pa.RecordBatch]) -> None:
        if not failures:
            path = next(iter(paths))
            path.write_bytes(b"ARROW1\0\0" + b"\0" * 100)  # the start of a file, then no space
            failures.append(path.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_all(paths)

    monkeypatch.setattr(segment_module, "_write_all", full_disk)
    second = _docs(100, 200, "b") + [Change.of("d0", None, 1, {})]  # replaces, adds and deletes
    with pytest.raises(OSError) as raised:
        await collection.apply(second, {"n": 2})
    assert raised.value.errno == errno.ENOSPC and failures
    assert _state(collection) == state, "a failed refresh is visible"
    assert collection.checkpoint == {"n": 1}
    assert (tmp_path / "c" / MANIFEST).read_bytes() == manifest
    assert _files(tmp_path / "c") == files, "the half-written file was left behind"

    await collection.apply(second, {"n": 2})  # the disk has room again
    assert _state(collection) == _expected(first + second)
    await collection.close()
    reopened = Collection.open(tmp_path / "c")
    assert _state(reopened) == _expected(first + second) and reopened.checkpoint == {"n": 2}
    await reopened.close()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


async def test_disk_full_on_a_real_small_tmpfs(tmp_path: Path):
    """The real thing: a 3 MiB tmpfs fills up; then it is grown and the same batch goes in."""
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        collection = Collection.open(disk / "c")
        applied: list[Change] = []
        failed_batch = None
        for n in range(200):
            batch = _docs(n * 300, 300, f"b{n}")
            manifest, state = _manifest(disk / "c"), _state(collection)
            try:
                await collection.apply(batch, {"n": n})
            except Exception as error:  # noqa: BLE001 - ENOSPC from the segment writer or the text index
                failed_batch = batch
                print(f"\nbatch {n} failed: {error!r}")
                break
            applied += batch
        assert failed_batch is not None, "the tmpfs never filled up"
        assert _state(collection) == state == _expected(applied)
        assert _manifest(disk / "c") == manifest
        assert collection.checkpoint == {"n": n - 1}

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        await collection.apply(failed_batch, {"n": n})
        applied += failed_batch
        assert _state(collection) == _expected(applied)
        await collection.close()
        reopened = Collection.open(disk / "c")
        assert _state(reopened) == _expected(applied) and reopened.checkpoint == {"n": n}
        await reopened.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


async def test_disk_full_end_to_end(ddb: Dynamo, moto_server: str, table_name: str, tmp_path: Path):
    """A Shoal server whose data dir is a 4 MiB tmpfs ingests until the disk is full: the status
    shows the error, ingest retries; the disk grows and the collection catches up to the table."""
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    shoal = ShoalProcess(disk / "data", tmp_path / "shoal.log", key="key-disk-full-0123456789")
    try:
        ddb.create_table(table_name)
        shoal.start()
        await shoal.create_integration("moto", moto_server)
        await shoal.create_collection("c", "moto", table_name)
        await shoal.wait_ready("c")

        async def disk_full_shown():
            status = (await shoal.get_collection("c"))["sources"][0]["status"]
            return status["state"] == "ERROR" and status["message"]

        written = 0
        message = None
        while message is None:
            assert written < 20_000, "the 4 MiB disk never filled up"
            ddb.batch_write(table_name, [{"pk": {"S": f"k{written + i:06d}"}, "text": {"S": f"filler {written + i} " * 100}}
                                         for i in range(250)])
            written += 250
            try:
                message = await wait_until(disk_full_shown, 3, 0.2, "the disk-full error")
            except AssertionError:
                pass
        print(f"\nafter {written} items the status said: {message!r}")
        assert "space" in message.lower() and "data directory is full" in message, message
        assert shoal.running, f"the server died of a full disk:\n{shoal.log_tail(40)}"

        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        table = {item["pk"]["S"]: item for item in ddb.scan_all(table_name)}

        async def converged():
            rows = await shoal.query("SELECT * FROM commons.c LIMIT 1000000", limit=1_000_000)
            problems = compare_collection(rows, table)
            assert not problems, "\n".join(problems)
            return (await shoal.get_collection("c"))["sources"][0]["status"]["state"] != "ERROR"

        await wait_until(converged, 90, 0.5, "the collection to catch up once the disk has room",
                         describe=lambda: shoal.get_collection("c"))
    finally:
        shoal.stop()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- killed while compacting

# The child: applies batch after batch from the checkpoint on, and prints `compacting <n>` when
# the refresh of batch n is about to merge or rewrite segments, `applied <n>` once batch n is
# committed. With a kill point other than "random" it SIGKILLs itself in the first compacting
# refresh 3 batches after its start: just before the manifest is written, or just after it
# replaced the old one (before the files it no longer names are removed).
CHILD = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from shoal.index import collection as module
    sys.path.insert(0, sys.argv[2])
    from test_faults import batch

    kill_point = sys.argv[3]
    current, first, compacting = [0], [0], [False]
    real_compact, real_write_fsync, real_replace = module.Collection._compact, module.write_fsync, os.replace

    def compact(self, snapshot):
        live = [v for v in snapshot.views if v.live_count]
        compacting[0] = len(live) > module.MAX_SEGMENTS or any(
            v.live_count < v.segment.rows * (1 - module.MAX_DEAD_FRACTION) for v in live)
        if compacting[0]:
            print("compacting", current[0], flush=True)
        return real_compact(self, snapshot)

    def kill_if(point):
        if kill_point == point and compacting[0] and current[0] >= first[0] + 3:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_fsync(path, data):
        kill_if("before-manifest")
        real_write_fsync(path, data)

    def replace(source, target):
        real_replace(source, target)
        if str(target).endswith(module.MANIFEST):
            kill_if("after-manifest")

    module.write_fsync, os.replace = write_fsync, replace
    module.Collection._compact = compact

    async def main():
        coll = module.Collection.open(Path(sys.argv[1]))
        n = first[0] = (coll.checkpoint or {}).get("batch", 0)
        for n in range(n + 1, n + 200):
            current[0] = n
            await coll.apply(batch(n), {"batch": n})
            print("applied", n, flush=True)

    asyncio.run(main())
""")
KILLS = 8


def batch(n: int) -> list[Change]:
    """Batch n: 800 upserts and 100 deletes over a key space of 6,000 (deterministic)."""
    rng = random.Random(n)
    ids = rng.sample(range(6000), 900)
    return ([Change.of(f"d{i}", {"n": n, "tag": f"t{i % 7}", "text": f"batch {n} word{i % 17}"}, n, {}) for i in ids[:800]]
            + [Change.of(f"d{i}", None, n, {}) for i in ids[800:]])


def _applied_up_to(n: int) -> dict[str, dict]:
    return _expected([change for k in range(1, n + 1) for change in batch(k)])


@pytest.mark.parametrize("kill_point", ["random", "before-manifest", "after-manifest"])
async def test_killed_during_compaction(tmp_path: Path, kill_point: str):
    rng = random.Random()
    directory = tmp_path / "c"
    landed = 0
    kills = KILLS if kill_point == "random" else 3
    tests_dir = str(Path(__file__).parent)
    for kill in range(kills):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), tests_dir, kill_point],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        read = []
        try:
            assert child.stdout is not None
            if kill_point == "random":
                # The first compacting refresh runs to its end and is timed; the next is killed
                # at a random moment within that time (10-25 ms here, more on a loaded machine).
                began = took = None
                for line in child.stdout:
                    read.append(line)
                    if line.startswith("compacting") and took is None:
                        began = time.perf_counter()
                    elif line.startswith("compacting"):
                        time.sleep(rng.uniform(0.0, took))
                        child.kill()
                        break
                    elif line.startswith("applied") and began is not None and took is None:
                        took = time.perf_counter() - began
        finally:
            rest, errors = child.communicate(timeout=60)
            child.kill()
        assert child.returncode == -signal.SIGKILL, f"the child ended by itself ({child.returncode}): {errors[-3000:]}"
        lines = [*read, *rest.splitlines()]
        compacting = max(int(l.split()[1]) for l in lines if l.startswith("compacting"))
        committed = [int(l.split()[1]) for l in lines if l.startswith("applied")]
        landed += compacting not in committed  # killed after the last compaction began, before its commit returned
        collection = Collection.open(directory)
        checkpoint = collection.checkpoint["batch"]
        last_said = max(committed, default=compacting - 1)
        assert checkpoint in (last_said, last_said + 1), f"kill {kill}: checkpoint {checkpoint}, last applied {last_said}"
        state = _state(collection)
        expected = _applied_up_to(checkpoint)
        assert state == expected, (f"kill {kill} (compacting batch {compacting}): the collection differs from "
                                   f"batches 1..{checkpoint}: {len(state)} vs {len(expected)} documents")
        assert len(collection.snapshot().views) <= 13
        await collection.close()
    print(f"\n{kill_point}: {landed} of {kills} kills landed before the compacting refresh committed")
    assert landed >= kills // 2, f"only {landed} of {kills} kills landed during a compaction"
