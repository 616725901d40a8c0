"""`shoal serve` runs the server; `shoal demo` runs it against a local sample table."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import stat
import sys
from pathlib import Path

from aiohttp import web


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise SystemExit("shoal serve: --tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


# What a data directory of Shoal's holds (`server/catalog.py`, `server/auth.py`, `server/app.py`,
# and `shoal demo`'s key and server log).
_DATA_DIR_ENTRIES = ("api_keys.json", "integrations.json", "collections", "lambdas.json", "generated-api-key",
                     "demo-api-key", "shoal-server.log")


def _make_owner_only(data_dir: Path) -> None:
    """Create the data directory owner-only, or make an existing one so: only when it is empty
    or already Shoal's, never a directory holding other things (`--data-dir /tmp` or a home)."""
    try:
        data_dir.mkdir(parents=True, mode=0o700)
        return
    except FileExistsError:
        if not data_dir.is_dir():
            raise SystemExit(f"shoal serve: --data-dir {data_dir} is not a directory") from None
    if stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0:
        return
    foreign = sorted(entry.name for entry in data_dir.iterdir() if entry.name not in _DATA_DIR_ENTRIES)
    if foreign:
        raise SystemExit(
            f"shoal serve: --data-dir {data_dir} is open to other users and holds files that are not Shoal's "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}). Shoal makes its data directory "
            "owner-only (it holds secrets): give it a new or empty directory of its own.")
    os.chmod(data_dir, 0o700)


def _hand_over(key: str, data_dir: Path) -> None:
    """Show a generated API key once: on the terminal when there is one; otherwise (a service
    whose output goes to a log) in an owner-only file, so it never sits in a log. Only its
    digest is kept by the server."""
    if sys.stdout.isatty():
        print(f"Generated API key (shown once, keep it): {key}", flush=True)
        return
    path = data_dir / "generated-api-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    print(f"Generated API key `default`: written to {path} (owner-only), not to this log. "
          "Keep it elsewhere and delete the file.", flush=True)


def _serve(args: argparse.Namespace) -> int:
    from shoal.index.memory import use_system_allocator

    from .app import SHUTDOWN_GRACE_S, make_app
    from .auth import ApiKeys
    from .queries import QueryLimits

    use_system_allocator()
    os.umask(0o077)  # the documents, indexes and secrets it writes are the owner's alone
    data_dir = Path(args.data_dir).resolve()
    _make_owner_only(data_dir)
    keys, new_key = ApiKeys.load(data_dir, args.api_key or os.environ.get("SHOAL_API_KEY"))
    if new_key:
        _hand_over(new_key, data_dir)
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform; asyncio's loop works too
        uvloop = None
    tls = _tls_context(args.tls_cert, args.tls_key)
    if tls is None and args.host not in LOOPBACK_HOSTS:
        print(
            f"WARNING: listening on {args.host} without TLS: API keys and query results cross the "
            "network in clear text. Serve HTTPS with --tls-cert and --tls-key, or bind to 127.0.0.1 behind a proxy.",
            file=sys.stderr,
            flush=True,
        )
    limits = QueryLimits(
        concurrent=args.max_concurrent_queries,
        queued=args.max_queued_queries,
        memory_bytes=args.query_memory_mb << 20,
    )
    listening = f"Shoal listening on {'https' if tls else 'http'}://{args.host}:{args.port} (data in {data_dir})"
    web.run_app(
        make_app(data_dir, keys, limits),
        host=args.host,
        port=args.port,
        ssl_context=tls,
        shutdown_timeout=SHUTDOWN_GRACE_S + 2,  # a backstop: queries are cancelled at the grace
        print=lambda _: print(listening, flush=True),  # once the socket is bound and the catalog loaded
        access_log=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from .queries import QueryLimits

    parser = argparse.ArgumentParser(prog="shoal", description="Real-time SQL over DynamoDB tables")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Shoal server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--data-dir", default="./shoal-data")
    serve.add_argument("--api-key", help="accept this API key (default: $SHOAL_API_KEY, else one generated on first start)")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM file)")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM file)")
    defaults = QueryLimits()
    serve.add_argument("--max-concurrent-queries", type=int, default=defaults.concurrent, help="queries running at once")
    serve.add_argument("--max-queued-queries", type=int, default=defaults.queued, help="queries waiting; beyond, a 429")
    serve.add_argument("--query-memory-mb", type=int, default=defaults.memory_bytes >> 20, help="memory one query may use")
    serve.set_defaults(run=_serve)
    # `shoal demo` parses its own options (see server/demo.py).
    commands.add_parser("demo", help="run Shoal on a local DynamoDB endpoint with a sample table", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.run(args)


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())
