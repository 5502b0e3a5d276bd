"""`pdserve router --prefill HOST:PORT ... --decode HOST:PORT ... --port 8000`."""
from __future__ import annotations

import argparse
import logging

from pdserve.api_key import add_api_key_args, resolve_api_key
from pdserve.config import RouterConfig, parse_size
from pdserve.router.instances import split_addrs
from pdserve.router.policies import POLICIES

log = logging.getLogger("pdserve.router")


def add_arguments(p: argparse.ArgumentParser, name: str = "router") -> None:
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT",
                   help="prefill worker(s); repeat the flag or separate with commas")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT",
                   help="decode worker(s) (a `both` worker here prefills locally)")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--policy", default="round_robin", choices=sorted(POLICIES),
                   help="how a worker is picked from a pool")
    p.add_argument("--local-prefill-max-tokens", type=int, default=0, metavar="N",
                   help="prefill on the decode worker when the prompt, less what that worker likely has "
                        "cached, is at most N tokens (0: always remote while a prefill worker is healthy)")
    add_api_key_args(p, "the router sends it to the workers too")
    p.add_argument("--max-request-bytes", type=parse_size, default=8 << 20, metavar="SIZE",
                   help="refuse larger request bodies with 413 (default 8MiB)")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a worker may stay silent during a call before it counts as failed")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    cfg = RouterConfig(prefill=split_addrs(args.prefill), decode=split_addrs(args.decode), host=args.host,
                       port=args.port, policy=args.policy, local_prefill_max_tokens=args.local_prefill_max_tokens,
                       api_key=resolve_api_key(args), max_request_bytes=args.max_request_bytes,
                       metrics_no_auth=args.metrics_no_auth)
    if cfg.local_prefill_max_tokens < 0:
        raise ValueError("--local-prefill-max-tokens must be >= 0")
    return cfg


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from pdserve.router.app import make_app
    cfg = config_from_args(args)
    if not cfg.decode:
        log.warning("no decode worker yet: add them with POST /instances or workers' --register")
    app = make_app(cfg, health_interval=args.health_interval, request_timeout=args.request_timeout)
    print(f"pdserve router on http://{cfg.host}:{cfg.port}  prefill={cfg.prefill} decode={cfg.decode} "
          f"policy={cfg.policy} local_prefill_max_tokens={cfg.local_prefill_max_tokens}", flush=True)
    # handler_cancellation: a client that goes away cancels its handler, which closes the calls
    # to the workers, which abort the request there
    web.run_app(app, host=cfg.host, port=cfg.port, handler_cancellation=True, access_log=None,
                print=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pdserve.router.cli`: the router alone, without loading the other commands'
    modules (some of which import torch) as `pdserve router` does to build its help."""
    from pdserve.cli import HelpFormatter   # argparse only: no torch
    p = argparse.ArgumentParser(prog="pdserve router", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
