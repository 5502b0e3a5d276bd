"""Entry points: `pdserve up --ray ADDRESS` (run_up) and `pdserve scale --ray ADDRESS`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def connect(address: str, namespace: str):
    """ray.init on `address`. Ray rewrites a loopback address to this host's outward IP before
    dialling, which a cluster started with --node-ip-address 127.0.0.1 does not listen on; keep
    loopback as given (a one-host cluster, and every test)."""
    import ray
    host = address.rsplit(":", 1)[0].strip("[]") if address not in ("auto", "local") else ""
    if host in ("127.0.0.1", "localhost", "::1"):
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False   # read at call time by services.get_node_ip_address
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="WARNING")
    return ray


def run_up(args: argparse.Namespace) -> int:
    from pdserve.ray_cluster.settings import load
    dep, settings = load(args)
    ray = connect(args.ray, settings.namespace)
    from pdserve.ray_cluster.driver import RayDeployment, ready_message

    from pdserve.launch.cluster import ignore_signals, interrupt_on_signals
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-")
    os.makedirs(log_dir, exist_ok=True)
    interrupt_on_signals()
    print(f"pdserve up: starting {len(dep.workers)} worker actor(s) on Ray {args.ray} and the router "
          f"(router log in {log_dir}) ...", flush=True)
    rd = RayDeployment(dep, settings, log_dir, say=lambda s: print(s, flush=True))
    try:
        rd.start(timeout=args.startup_timeout)
        print(ready_message(rd, args.ray), flush=True)
        while True:
            try:
                rd.step()
            except Exception as e:   # the supervisor outlives one bad poll (a node going away mid-call)
                print(f"pdserve up: {e!r}", flush=True)
            if not rd.router.alive():
                print(f"pdserve up: the router exited ({rd.router.returncode()}); log: {rd.router.log_path}",
                      flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("pdserve up: stopping ...", flush=True)
        return 0
    finally:
        ignore_signals()
        rd.stop()
        ray.shutdown()
        if not args.log_dir:   # as the local `up`: the router's log goes unless asked to keep it
            shutil.rmtree(log_dir, ignore_errors=True)
        print("pdserve up: stopped", flush=True)


# ---- pdserve scale ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, name: str = "scale") -> None:
    p.add_argument("--ray", required=True, metavar="ADDRESS", help="the Ray cluster `pdserve up --ray` runs on")
    p.add_argument("--namespace", default="pdserve", help="Ray namespace of the deployment's actors")
    p.add_argument("--prefill", type=int, default=None, metavar="N", help="wanted prefill workers (default: unchanged)")
    p.add_argument("--decode", type=int, default=None, metavar="M", help="wanted decode workers (default: unchanged)")
    p.add_argument("--colocated", type=int, default=None, metavar="K",
                   help="wanted colocated (`both`) workers (default: unchanged)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait until the deployment has the new counts (added workers registered, removed "
                        "ones drained), at most this long")


def run(args: argparse.Namespace) -> int:
    from pdserve.ray_cluster.driver import CONTROLLER
    ray = connect(args.ray, args.namespace)
    try:
        try:
            ctrl = ray.get_actor(CONTROLLER, namespace=args.namespace)
        except ValueError:
            raise ValueError(f"no `pdserve up --ray` running in namespace {args.namespace!r} on {args.ray}")
        want = {r: n for r, n in (("prefill", args.prefill), ("decode", args.decode), ("both", args.colocated))
                if n is not None}
        if want:
            from ray.exceptions import RayTaskError
            try:
                counts = ray.get(ctrl.set_counts.remote(want))
            except RayTaskError as e:
                raise ValueError(str(e.cause))
        else:
            counts = ray.get(ctrl.get.remote())["counts"]
        deadline = time.monotonic() + args.wait
        while True:
            got = ray.get(ctrl.get.remote())
            if args.wait <= 0 or reached(got, counts) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(json.dumps({"counts": counts, "reached": reached(got, counts), "state": got["state"],
                          "router_url": got["router_url"]}, indent=1))
        return 0 if args.wait <= 0 or reached(got, counts) else 1
    finally:
        ray.shutdown()


def reached(got: dict, counts: dict) -> bool:
    state = got.get("state") or {}
    return bool(state) and all(len(state.get(r, [])) == n and all(w["url"] and not w["draining"]
                                                                    for w in state.get(r, []))
                               for r, n in counts.items())
