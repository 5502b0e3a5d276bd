"""Shared fixtures. Tests that need the default model share one converted copy in the cache."""
from __future__ import annotations

import os

import pytest

# keep the two cores for the work under test, not for oversubscribed BLAS threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# as every pdserve process does (pdserve.cpu_threads): idle OpenMP threads sleep instead of
# spinning, before any test module imports torch; in-process engines on a busy machine then
# slow down in proportion instead of stalling
from pdserve.cpu_threads import prepare_env  # noqa: E402  (no torch import)

prepare_env()


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model (SmolLM2-135M-Instruct), converted from its GGUF once and cached."""
    from pdserve.models.loader import resolve_model
    return resolve_model(None)[1]


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the CPU decode-attention op once, before any test starts a server: on a fresh
    machine the build takes a minute or two, which must not land inside a server's start-up
    timeout. Cached afterwards; where it cannot build, the torch backend serves."""
    from pdserve.models.cpu_kernels import paged_decode_op
    paged_decode_op()
