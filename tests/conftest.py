"""Shared fixtures. Tests that need the default model share one converted copy in the cache."""
from __future__ import annotations

import os

import pytest

# keep the two cores for the work under test, not for oversubscribed BLAS threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# before any test module imports torch (pdserve.cpu_threads): a test process runs torch on all
# the cores beside the suite's other worker process, a fixed count that cannot step aside, so
# its idle OpenMP threads sleep instead of spinning and a busy machine slows it in proportion.
# Marked as pdserve's choice: the servers the tests start decide their own, as users' do.
from pdserve.cpu_threads import prepare_env  # noqa: E402  (no torch import)

prepare_env(len(os.sched_getaffinity(0)))


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model (SmolLM2-135M-Instruct), converted from its GGUF once and cached."""
    from pdserve.models.loader import resolve_model
    return resolve_model(None)[1]


@pytest.fixture(scope="module")
def bench_server():
    """tests/bench_fake_server.py in a thread: (the server, its URL)."""
    from bench_fake_server import start_in_thread
    from helpers import free_port
    port = free_port()
    srv, stop = start_in_thread(port)
    yield srv, f"http://127.0.0.1:{port}"
    stop()


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the CPU decode-attention op once, before any test starts a server: on a fresh
    machine the build takes a minute or two, which must not land inside a server's start-up
    timeout. Cached afterwards; where it cannot build, the torch backend serves."""
    from pdserve.models.cpu_kernels import paged_decode_op
    paged_decode_op()


def pytest_collection_modifyitems(config, items):
    """The `slow` marker, kept honest: a test that needs the default model (converting it is
    minutes on a fresh machine) must be marked slow, so that `-m "not slow"` stays quick.
    Under pytest-xdist the files with slow tests come first (see pytest_xdist_make_scheduler)."""
    unmarked = [it.nodeid for it in items if "default_model_dir" in it.fixturenames and it.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("needs the default model but is not marked slow: " + ", ".join(unmarked))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow_files = {it.path for it in items if it.get_closest_marker("slow") is not None}
        items.sort(key=lambda it: it.path not in slow_files)   # stable: each file keeps its order


# Files that must not run beside each other under pytest-xdist: one group runs on one worker,
# file after file (two Ray clusters on 2 cores at once would starve both).
XDIST_GROUPS = {"test_ray_cluster.py": "ray", "test_ray_autoscale.py": "ray"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (`make test`), with XDIST_GROUPS: each file (or group) is one unit on
    one worker, so its module fixtures (servers, clusters) start once, and the units are handed
    out in collection order, the slow files first, so that quick files fill the end rather than
    one long file running alone. (pytest-xdist's own `loadgroup` marks do not reach its
    scheduler under pytest 9.2, which no longer reads Item._nodeid.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return XDIST_GROUPS.get(os.path.basename(path), path)

    config.option.loadscopereorder = False   # xdist would sort the units by test count
    return FilesAndGroups(config, log)


@pytest.fixture(autouse=True)
def _quick_tests_start_no_python_process(request, monkeypatch):
    """A test not marked slow must not start a Python process (a worker, a router, a CLI run):
    it fails at once, naming itself. (A quick probe of a tool, e.g. nvidia-smi, is let through.)"""
    if request.node.get_closest_marker("slow") is None:
        import subprocess
        import sys
        popen_init = subprocess.Popen.__init__

        def guarded(self, args, *a, **kw):
            prog = args if isinstance(args, (str, bytes)) else (list(args) or [""])[0]
            if os.path.basename(str(prog)).startswith(("python", "pdserve")) or str(prog) == sys.executable:
                raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")
            popen_init(self, args, *a, **kw)
        monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
