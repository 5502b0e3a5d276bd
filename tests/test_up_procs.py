"""`pdserve up`'s children die with it, even when it is SIGKILLed (no chance to clean up)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow  # starts processes


def test_children_die_with_a_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", f"""
import time
from pdserve.procs import Proc
p = Proc(["sleep", "300"], {str(tmp_path / 'c.log')!r}, "child", cpus=[0])
print(p.pid, flush=True)
time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert psutil.Process(child).cpu_affinity() == [0]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 60   # a hang guard: the loop ends once the child is gone
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child), "the child outlived its SIGKILLed parent"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
