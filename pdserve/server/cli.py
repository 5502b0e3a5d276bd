"""`pdserve serve [MODEL] --role prefill|decode|both`: one worker, OpenAI API and KV hand-off."""
from __future__ import annotations

import argparse
import logging
import signal

from pdserve.cli.args import add_engine_args, engine_config_from_args
from pdserve.api_key import add_api_key_args, resolve_api_key
from pdserve.config import KVTransferConfig, parse_size
from pdserve.kv.select import check_transport

log = logging.getLogger("pdserve.server")


def _transport(value: str) -> str:
    try:
        return check_transport(value)
    except ValueError as e:   # argparse words it as "argument --kv-transport: <message>"
        raise argparse.ArgumentTypeError(str(e)) from None

def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_api_key_args(s, "the router sends it too")
    s.add_argument("--max-request-bytes", type=parse_size, default=8 << 20, metavar="SIZE",
                   help="refuse larger request bodies with 413 (default 8MiB)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests (rendered in a sandbox with a size and time budget)")
    s.add_argument("--register", default=None, metavar="ROUTER_URL",
                   help="add this worker to a pdserve router's pools once it is up (and leave them on exit)")
    from pdserve import cpu_threads
    cpu_threads.add_arguments(p)
    from pdserve.server.tools import PARSERS
    t = p.add_argument_group("tool calling")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto": the model decides, its output is parsed for tool calls')
    t.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how tool calls are written in the output (needed with --enable-auto-tool-choice)")
    k = p.add_argument_group("KV transfer")
    k.add_argument("--kv-transport", type=_transport, default="auto",
                   help="how KV blocks travel between workers (auto: the fastest both ends offer)")
    k.add_argument("--kv-host", default=None, help="KV server bind address (default: --host)")
    k.add_argument("--kv-port", type=int, default=0, help="KV server port (default: a free one)")
    k.add_argument("--kv-advertise-host", default=None,
                   help="host that decode workers should connect to (default: the KV bind address)")
    k.add_argument("--kv-load-failure-policy", choices=("recompute", "fail"), default="recompute",
                   help="decode worker, when a KV pull fails: prefill the prompt itself, or fail the request")
    k.add_argument("--kv-pull-timeout", type=float, default=30.0,
                   help="deadline in seconds of a whole KV pull (connect, handshake, every byte); a slower "
                        "pull fails and --kv-load-failure-policy applies")
    k.add_argument("--kv-secret", default=None,
                   help="shared secret proving KV peers to each other (default: $PDSERVE_KV_SECRET, else derived "
                        "from --api-key; with neither, KV connections are unauthenticated and pulls loopback-only)")
    k.add_argument("--kv-allowed-peers", default=None, metavar="HOST:PORT,...",
                   help="decode role: the only KV servers to pull from (default: any that proves the secret; "
                        "without a secret, loopback only)")
    k.add_argument("--kv-max-connections", type=int, default=128,
                   help="KV server: connections at once; more are closed at once")
    k.add_argument("--kv-tls-cert", default=None, metavar="PEM",
                   help="KV server: serve KV connections over TLS with this certificate (chain), for tcp across "
                        "hosts; the KV secret's challenge still runs inside")
    k.add_argument("--kv-tls-key", default=None, metavar="PEM", help="KV server: the certificate's private key "
                   "(default: in the --kv-tls-cert file)")
    k.add_argument("--kv-tls-ca", default=None, metavar="PEM",
                   help="decode role: dial KV servers over TLS and accept only certificates this CA signed "
                        "for the host dialled")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve import cpu_threads
    from pdserve.server.app import build_app
    from pdserve.server.worker import ServerConfig, Worker

    cpu_threads.setup_from_args(args)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser (one of hermes, llama3_json)")

    ec = engine_config_from_args(args)
    kc = KVTransferConfig(kv_transport=args.kv_transport, kv_host=args.kv_host, kv_port=args.kv_port,
                          kv_load_failure_policy=args.kv_load_failure_policy, kv_pull_timeout=args.kv_pull_timeout,
                          kv_secret=args.kv_secret, kv_allowed_peers=args.kv_allowed_peers,
                          kv_max_connections=args.kv_max_connections, kv_tls_cert=args.kv_tls_cert,
                          kv_tls_key=args.kv_tls_key, kv_tls_ca=args.kv_tls_ca)
    api_key = resolve_api_key(args)
    sc = ServerConfig(args.host, args.port, api_key, args.kv_advertise_host,
                      enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                      max_request_bytes=args.max_request_bytes, metrics_no_auth=args.metrics_no_auth,
                      trust_request_chat_template=args.trust_request_chat_template, exit_on_engine_death=True)
    worker = Worker(ec, kc, sc).start()
    reg = None
    if args.register:
        from pdserve.server.register import Registration
        # a wildcard bind is not an address the router can call: advertise loopback or --kv-advertise-host
        host = args.kv_advertise_host or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host)
        reg = Registration(args.register, args.role, f"http://{host}:{args.port}", api_key).start()
    try:
        info = worker.info()
        kv = (f"KV server {info['kv_host']}:{info['kv_port']} offers {', '.join(info['kv_transports'])}"
              if info["kv_port"] else f"pulls KV over {args.kv_transport}")
        log.info("pdserve worker: role %s, model %s, http://%s:%d, %s; policy on a failed pull: %s",
                 worker.role, worker.model_name, args.host, args.port, kv, args.kv_load_failure_policy)
        # uvicorn turns SIGTERM into a graceful shutdown, then re-raises it to the handler that was
        # there before: make that one raise KeyboardInterrupt (not kill the process) so that
        # `finally` runs: it unlinks the shared memory and leaves the router's pools
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        uvicorn.run(build_app(worker), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=2)
    except KeyboardInterrupt:
        pass
    finally:
        if reg is not None:
            reg.stop()
        worker.stop()
    if worker.died is not None:
        log.critical("exiting: the engine loop died: %r", worker.died)
        return 1
    return 0
