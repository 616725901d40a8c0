"""`shoal serve` runs the server; `shoal demo` runs it against a local sample table."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from aiohttp import web


def _serve(args: argparse.Namespace) -> int:
    from .app import make_app
    from .auth import ApiKeys

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
    print(f"Shoal listening on http://{args.host}:{args.port} (data in {data_dir})", flush=True)
    web.run_app(
        make_app(data_dir, keys),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop() if uvloop else None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal", description="Real-time SQL over DynamoDB tables")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Shoal server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--data-dir", default="./shoal-data")
    serve.add_argument("--api-key", help="accept this API key (default: $SHOAL_API_KEY, else one generated on first start)")
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
