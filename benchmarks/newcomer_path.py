"""A newcomer's first hour, replayed: a fresh clone, the README's two commands, then each
README example command, optionally with CPU hogs beside them. Prints each step's time and
exit code and writes newcomer_path.json (+ .md with --md).

    python benchmarks/newcomer_path.py [--hog 2] [--skip-test] [--md benchmarks/newcomer_path.md]

Every command below is checked to appear verbatim in the README (so the two stay in step);
commands that start servers run in the background until their endpoint answers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CURL = """curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'"""

# (name, command as the README gives it, kind): "run" to completion, or "serve" until /health answers
STEPS = [
    ("generate", 'pdserve generate "The capital of France is" --max-tokens 32', "run"),
    ("python API", "python example.py", "run"),   # the README's Python block, written to example.py
    ("bench", "pdserve bench --base-url http://127.0.0.1:8000 --dataset-name random --num-prompts 20 "
              "--request-rate 2 --slo ttft_ms=2000 tpot_ms=200 --output result.json --plot plots/", "run"),
    ("up colocated", "pdserve up --colocated 2 --port 8001", "serve:8001"),
    ("sim gen", "pdserve sim gen --output trace.jsonl --num-requests 200", "run"),
    ("sim", "pdserve sim --cluster-config pdserve/sim/configs/single_node_pd_instance.json "
            "--dataset trace.jsonl --output out.csv", "run"),
    ("plan", "pdserve plan --devices 8 --hardware H100 --model meta-llama/Llama-3.1-8B --dataset trace.jsonl "
             "--num-requests 100 --slo ttft_ms=500 tpot_ms=50", "run"),
    ("profile", "pdserve profile --grid quick --output profile.json", "run"),
    ("bench compare", 'pdserve bench compare --a "up --prefill 1 --decode 1" --b "up --colocated 1" '
                      "--num-prompts 10 --sweep-rate 1", "run"),
]


def python_example(readme: str) -> str:
    start = readme.index("```python\n") + len("```python\n")
    return readme[start:readme.index("```", start)]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_health(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def step(name: str, cmd: str, cwd: Path, env: dict, log: Path, results: list, timeout: float = 3600) -> int:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {cmd}", flush=True)
    t = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {cmd}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout, executable="/bin/bash").returncode
        except subprocess.TimeoutExpired:
            rc = 124
    results.append({"step": name, "command": cmd, "seconds": round(time.monotonic() - t, 1), "rc": rc})
    print(f"    rc={rc} in {results[-1]['seconds']} s", flush=True)
    return rc


def serve(name: str, cmd: str, port: int, cwd: Path, env: dict, log: Path, results: list,
          timeout: float = 900) -> subprocess.Popen | None:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {cmd} (until :{port}/health answers)", flush=True)
    t = time.monotonic()
    out = open(log, "ab")
    out.write(f"\n$ {cmd} &\n".encode())
    out.flush()
    proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, executable="/bin/bash")
    ok = wait_health(port, proc, timeout)
    results.append({"step": name, "command": cmd, "seconds": round(time.monotonic() - t, 1), "rc": 0 if ok else 1})
    print(f"    {'up' if ok else 'FAILED'} in {results[-1]['seconds']} s", flush=True)
    if not ok:
        stop(proc)
        return None
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hog", type=int, default=0, help="CPU-bound busy loops to run beside every step")
    ap.add_argument("--skip-test", action="store_true", help="do not run `make test` (it takes the longest)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--json", default="newcomer_path.json", help="where to write the results")
    ap.add_argument("--md", default=None, help="also write a markdown table here")
    args = ap.parse_args()

    readme = (REPO / "README.md").read_text()
    missing = [c for _, c, _ in STEPS if c.startswith("pdserve") and c not in readme] + ([] if CURL in readme else ["the curl example"])
    if missing:
        print("commands not in the README (update one or the other):\n  " + "\n  ".join(missing))
        return 2
    if port_open(8000) or port_open(8001):
        print("ports 8000/8001 must be free: the README's commands use them")
        return 2

    work = Path(tempfile.mkdtemp(prefix="pdserve-newcomer-"))
    clone, log = work / "pdserve", work / "log.txt"
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.hog)]
    results: list[dict] = []
    up = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        step("git clone", f"git clone -q {REPO} {clone}", work, env, log, results)
        (clone / "example.py").write_text(python_example(readme))
        if not args.skip_test:
            step("make test", "make test", clone, env, log, results)
        up = serve("make up", "make up", 8000, clone, env, log, results)
        env = {**env, "PATH": f"{clone / '.venv' / 'bin'}:{env['PATH']}"}   # as after `source .venv/bin/activate`
        if up:
            step("curl", CURL, clone, env, log, results)
        for name, cmd, kind in STEPS:
            if kind.startswith("serve"):
                p = serve(name, cmd, int(kind.split(":")[1]), clone, env, log, results)
                if p:
                    stop(p)
            elif up or "8000" not in cmd:
                step(name, cmd, clone, env, log, results)
    finally:
        if up:
            stop(up)
        for h in hogs:
            h.kill()
        load = os.getloadavg()[0]
    ok = all(r["rc"] == 0 for r in results)
    summary = {"hogs": args.hog, "load_average_1m_at_end": round(load, 1), "all_passed": ok, "steps": results,
               "log": str(log)}
    Path(args.json).write_text(json.dumps(summary, indent=2))
    lines = ["| step | command | seconds | exit |", "|---|---|---:|---:|"]
    lines += [f"| {r['step']} | `{' '.join(r['command'].split())[:90]}` | {r['seconds']} | {r['rc']} |"
              for r in results]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}, {args.hog} CPU hog(s) beside, "
                    f"load average {load:.1f} at the end: {'all passed' if ok else 'FAILURES'}\n\n")
            f.write("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"clone kept in {clone}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
