"""Command-line flags for the engine, derived from EngineConfig's fields (as vLLM's
EngineArgs.add_cli_args): `serve`, `up`, `generate`, `chat`, `profile`, `sim` and `plan` share them.
No torch: the router's and the simulator's commands import this too."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, fields

from pdserve.config import EngineConfig
# only a served worker has them: a role (`up` sets it per pool) and a lease on KV it holds for another
WORKER_FIELDS = ("role", "kv_lease_duration")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TYPES = {"int": int, "int | None": int, "float": float}   # field annotations are strings here


def _type(f: Field):
    return _TYPES.get(f.type)


def _default(f: Field):
    env = f.metadata["env"]
    if env and os.environ.get(env):
        conv = _type(f) or str
        return conv(os.environ[env])
    return f.default


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = True, exclude: tuple[str, ...] = (),
                    only: tuple[str, ...] | None = None, title: str = "engine") -> argparse._ArgumentGroup:
    """One flag per EngineConfig field (`model` positional unless model_positional is False),
    less `exclude`, or just `only`. Returns the group, for a command's own flags beside them."""
    g = p.add_argument_group(title)
    for f in fields(EngineConfig):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        assert f.default is not MISSING, f.name
        help_ = f.metadata["help"] + (f" (${f.metadata['env']} sets the default)" if f.metadata["env"] else "")
        if f.name == "model" and model_positional:
            p.add_argument("model", nargs="?", default=None, help=help_)
            continue
        kw = dict(f.metadata["argparse"], default=_default(f), help=help_)
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif _type(f):
            kw["type"] = _type(f)
        g.add_argument(flag(f.name), *f.metadata["flags"], dest=f.name, **kw)
    return g


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(overrides)
    return EngineConfig(**kw)
