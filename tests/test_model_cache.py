"""The converted-model cache is keyed by the GGUF file's content: a second clone or venv
holding the same file (another path, another name, another mtime) reuses the first copy."""
from __future__ import annotations

import os
import shutil

import pytest

from pdserve.models.loader import convert_gguf, default_gguf_path, file_digest

pytestmark = pytest.mark.slow


def test_same_gguf_elsewhere_reuses_the_converted_copy(default_model_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(default_gguf_path(), copy)
    os.utime(copy, (1, 1))                      # another mtime too
    assert file_digest(str(copy)) == file_digest(default_gguf_path())
    assert convert_gguf(str(copy)) == default_model_dir


def test_different_content_gets_another_key(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\0" * 99 + b"\1")
    assert file_digest(str(a)) != file_digest(str(b))
