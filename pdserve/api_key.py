"""Where an API key comes from: --api-key, --api-key-file or $PDSERVE_API_KEY. A key on the
command line is visible to every local user in `ps`; a file or the environment is not."""
from __future__ import annotations

import argparse
import os

ENV = "PDSERVE_API_KEY"


def add_api_key_args(p, what: str) -> None:
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health ({what}); "
                        f"prefer --api-key-file or ${ENV}, which `ps` does not show")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    p.add_argument("--metrics-no-auth", action="store_true", help="serve /metrics without the API key")


def resolve_api_key(args: argparse.Namespace) -> str | None:
    if args.api_key and args.api_key_file:
        raise SystemExit("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise SystemExit(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get(ENV) or None
