"""Fixtures for Shoal's end-to-end tests.

- `moto_server`: URL of a moto server subprocess (DynamoDB + Streams), one per session;
  tests use unique table names so they do not see each other's tables.
- `ddb`: a `support.Dynamo` (boto3, retries off) for that endpoint.
- `shoal`: a started `support.ShoalProcess` on a fresh data dir (killed at teardown).
- `shoal_unstarted`: the same, not started yet (for tests that load data first).
- `shoal_module`: one started server shared by a module (for cheap API checks).

When a test fails, the tail of every Shoal server log it used is attached to the report.
The helpers (`wait_until`, `Dynamo.create_table` with a stream, `ShoalProcess`) live in
`support.py` so test modules can import them.
"""

from __future__ import annotations

import os
import uuid

import pytest

from support import (  # noqa: F401 - re-exported for tests that prefer conftest names
    AWS_ENV,
    LOCAL_NO_PROXY,
    Dynamo,
    MotoProcess,
    ShoalProcess,
    tail,
    wait_until,
)

# The test process talks to 127.0.0.1 only; never through a proxy.
os.environ.setdefault("NO_PROXY", LOCAL_NO_PROXY)
os.environ.setdefault("no_proxy", LOCAL_NO_PROXY)
for _k, _v in AWS_ENV.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """URL of a real moto server (subprocess) serving DynamoDB and DynamoDB Streams."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = MotoProcess(log)
    moto.start()
    try:
        yield moto.url
    finally:
        moto.stop()


@pytest.fixture
def ddb(moto_server) -> Dynamo:
    return Dynamo(moto_server)


@pytest.fixture
def table_name() -> str:
    """A table name no other test uses (the moto server is shared by the session)."""
    return f"t_{uuid.uuid4().hex[:10]}"


def _new_shoal(base) -> ShoalProcess:
    base.mkdir(parents=True, exist_ok=True)
    return ShoalProcess(base / "data", base / "shoal.log", key=f"key-{uuid.uuid4().hex}")


@pytest.fixture
def shoal_unstarted(tmp_path):
    """A Shoal server on a fresh data dir, not started; killed at teardown."""
    proc = _new_shoal(tmp_path / "shoal")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def shoal(shoal_unstarted):
    """A started Shoal server on a fresh data dir."""
    shoal_unstarted.start()
    return shoal_unstarted


@pytest.fixture(scope="module")
def shoal_module(tmp_path_factory):
    """One started Shoal server shared by the tests of a module."""
    proc = _new_shoal(tmp_path_factory.mktemp("shoal_module"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the Shoal server log tail(s) to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        funcargs = getattr(item, "funcargs", {}) or {}
        seen = set()
        for value in funcargs.values():
            if isinstance(value, ShoalProcess) and id(value) not in seen:
                seen.add(id(value))
                report.sections.append(
                    (f"Shoal server log ({value.log_path})", tail(value.log_path, 200))
                )
