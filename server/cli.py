"""`shoal serve` runs the server; `shoal demo` runs it against a local sample table."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
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


def _serve(args: argparse.Namespace) -> int:
    from shoal.index.memory import use_system_allocator

    from .app import SHUTDOWN_GRACE_S, make_app
    from .auth import ApiKeys
    from .queries import QueryLimits

    use_system_allocator()
    os.umask(0o077)  # the documents, indexes and secrets it writes are the owner's alone
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    keys, new_key = ApiKeys.load(data_dir, args.api_key or os.environ.get("SHOAL_API_KEY"))
    if new_key:
        # Printed once: only its digest is stored.
        print(f"Generated API key (shown once, keep it): {new_key}", flush=True)
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
