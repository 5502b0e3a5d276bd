"""Shared fixtures. Tests that need the default model share one converted copy in the cache."""
from __future__ import annotations

import os

import pytest

# keep the two cores for the work under test, not for oversubscribed BLAS threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model (SmolLM2-135M-Instruct), converted from its GGUF once and cached."""
    from pdserve.models.loader import resolve_model
    return resolve_model(None)[1]
