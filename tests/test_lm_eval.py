"""lm-evaluation-harness against pdserve: a small multiple-choice task from a local file
(tests/data) scored with `local-completions` (echo + logprobs: the prompt logprobs) on a
pdserve worker, and with lm-eval's own `hf` backend on the same converted weights. Same
accuracy, and every choice's loglikelihood within 1e-3. Offline: the dataset is a local JSON
file, the tokenizer the model directory's."""
from __future__ import annotations

from pathlib import Path

import pytest

import helpers
from helpers import MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
TASK = "pdserve_mc_tiny"


@pytest.fixture(scope="module")
def worker(default_model_dir, tmp_path_factory):
    with helpers.serving(tmp_path_factory.mktemp("lmeval"), "--kv-cache-memory", "128MiB", "--dtype", "float32",
                         "--max-model-len", "1024", env={"OMP_NUM_THREADS": "1"}, timeout=300) as u:
        yield u


def evaluate(model: str, model_args: str) -> tuple[float, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    res = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=TaskManager(include_path=str(TASKS)),
                          batch_size=4, log_samples=True, device="cpu")
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return res["results"][TASK]["acc,none"], lls


def test_local_completions_equals_hf_backend(worker, default_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)   # the task's data_files path is relative to the repository
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    acc_srv, ll_srv = evaluate("local-completions",
                               f"model={MODEL},base_url={worker}/v1/completions,tokenizer={default_model_dir},"
                               "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")
    acc_hf, ll_hf = evaluate("hf", f"pretrained={default_model_dir},dtype=float32")
    worst = max(abs(x - y) for a, b in zip(ll_srv, ll_hf) for x, y in zip(a, b))
    print(f"lm-eval {TASK}: acc pdserve {acc_srv:.3f}, hf {acc_hf:.3f}; max |loglikelihood difference| {worst:.2e}")
    assert len(ll_srv) == len(ll_hf) == 20
    assert acc_srv == acc_hf
    assert acc_hf > 0.5, "the reference itself should know most of these"
    for a, b in zip(ll_srv, ll_hf):
        assert len(a) == len(b) == 4
        assert all(abs(x - y) < 1e-3 for x, y in zip(a, b)), (a, b)
    # no choice scored 0 (what a server without prompt logprobs gives: every choice the same)
    assert all(len(set(round(x, 6) for x in row)) > 1 for row in ll_srv)
