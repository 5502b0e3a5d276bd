"""Chat templates rendered in a jinja2 sandbox with a size and a time budget.

transformers renders templates in jinja's ImmutableSandboxedEnvironment, which stops a
template from reaching Python internals but not from spending: `{{ 'ab ' * 3000000 }}` or two
nested `range(100000)` loops freeze whoever renders them. Here every operator and call that
can grow a value checks the result's size first, the output is counted as it streams, and a
trace function ends a render that runs past its deadline. The variables a template sees are
transformers' (messages, add_generation_prompt, the special tokens, raise_exception,
strftime_now, tojson), so the rendered text is the same.
"""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

RENDER_SECONDS = 5.0         # a real chat template renders in milliseconds
MAX_TEMPLATE_CHARS = 256 << 10


class TemplateBudgetError(ValueError):
    """The template asked for more than its budget (size or time)."""


_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d*))?|\{[^{}]*?:[^{}]*?(\d+)")


def _max_width(fmt: str) -> int:
    """The widest field a %-format or str.format string asks for."""
    return max((int(n) for m in _WIDTH.finditer(fmt) for n in m.groups() if n), default=0)


class _Concat(CodeGenerator):
    """`a ~ b`: jinja joins in generated code that no sandbox hook sees; route it through one."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BudgetSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%", "+"])
    code_generator_class = _Concat

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_chars = max_chars
        self.filters = {name: self._checked(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._checked("tojson", _tojson)
        self.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                            namespace=self._namespace_class(), dict=lambda *a, **k: self._check(dict(*a, **k)))

    # ---- the budget ---------------------------------------------------------------------
    def _check(self, value):
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.max_chars:
            raise TemplateBudgetError(f"the chat template made a value of {len(value)} items, more than its "
                                      f"budget of {self.max_chars}")
        return value

    def _args(self, args, kwargs) -> None:
        """Arguments that size a result (center(10**9), ljust, indent, '%9999999s'...)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_chars:
                raise TemplateBudgetError(f"the chat template passed {a}, beyond its budget of {self.max_chars}")
            if isinstance(a, str) and ("%" in a or "{" in a) and _max_width(a) > self.max_chars:
                raise TemplateBudgetError("the chat template asked for a field wider than its budget")
            self._check(a)

    def _grows(self, name: str, subject, args) -> None:
        """Calls whose result can be far larger than their arguments, sized before they run."""
        size = 0
        if name in ("format", "format_map") and isinstance(subject, str):
            size = _max_width(subject)
        elif name == "replace" and len(args) >= 2 and all(isinstance(x, str) for x in (subject, *args[:2])):
            old, new = args[0], args[1]
            size = len(subject) + (subject.count(old) if old else len(subject) + 1) * len(new)
        elif name == "join" and isinstance(subject, str) and args and hasattr(args[0], "__len__"):
            size = len(subject) * len(args[0])
        elif name == "indent" and isinstance(subject, str):
            width = args[0] if args else 4
            size = len(subject) + (subject.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
        elif name == "expandtabs" and isinstance(subject, str):
            size = len(subject) + subject.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
        if size > self.max_chars:
            raise TemplateBudgetError(f"the chat template's {name}() would make {size} characters, "
                                      f"beyond its budget of {self.max_chars}")

    def _checked(self, name: str, f):
        def filt(*args, **kwargs):
            if args and isinstance(args[0], (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment)):
                args_ = args[1:]
            else:
                args_ = args
            self._args(args_, kwargs)
            if args_:
                subject, rest = args_[0], list(args_[1:]) + list(kwargs.values())
                if name == "join":   # value|join(d): the separator is the argument
                    subject, rest = (rest[0] if rest else ""), [subject]
                self._grows(name, subject, rest)
            return self._check(f(*args, **kwargs))
        if hasattr(f, "jinja_pass_arg"):   # @pass_context / @pass_eval_context / @pass_environment
            filt.jinja_pass_arg = f.jinja_pass_arg
        return filt

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise TemplateBudgetError(f"the chat template repeats a value {n} times, beyond its budget")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right * max(1, abs(left).bit_length()) > 4096:
                raise TemplateBudgetError("the chat template raises a number to too high a power")
        elif operator == "%" and isinstance(left, str) and _max_width(left) > self.max_chars:
            raise TemplateBudgetError("the chat template asked for a field wider than its budget")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and hasattr(right, "__len__"):
            if len(left) + len(right) > self.max_chars:
                raise TemplateBudgetError("the chat template built a value beyond its budget")
        return self._check(super().call_binop(context, operator, left, right))

    def concat(self, parts) -> str:
        if sum(len(p) if isinstance(p, str) else 0 for p in parts) > self.max_chars:
            raise TemplateBudgetError("the chat template built a string beyond its budget")
        return self._check(jinja2.runtime.str_join(parts))

    def call(self, __context, __obj, *args, **kwargs):
        self._args(args, kwargs)
        bound = getattr(__obj, "__wrapped__", __obj)   # the sandbox wraps str.format
        self._grows(getattr(__obj, "__name__", ""), getattr(bound, "__self__", None), list(args) + list(kwargs.values()))
        return self._check(super().call(__context, __obj, *args, **kwargs))

    def _namespace_class(self):
        env = self

        class BudgetNamespace(Namespace):
            """transformers' namespace (no underscore names), with values held to the budget."""
            def __setitem__(self, name, value):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")
                super().__setitem__(name, env._check(value))
        return BudgetNamespace


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str, max_chars: int):
    return BudgetSandbox(max_chars).from_string(source)


def render(source: str, max_chars: int, timeout: float = RENDER_SECONDS, **variables) -> str:
    """Render a chat template to text of at most max_chars characters within `timeout` seconds.
    Raises TemplateBudgetError past either, jinja2.TemplateError (and others) for a bad template."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateBudgetError(f"the chat template has {len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
    template = _compile(source, max_chars)
    deadline = time.monotonic() + timeout

    def tracer(frame, event, arg):   # per line of the template's code, and of what it calls
        if time.monotonic() > deadline:
            raise TemplateBudgetError(f"the chat template took more than {timeout:g}s to render")
        return tracer

    out, n = [], 0
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in template.generate(**variables):
            n += len(piece)
            if n > max_chars:
                raise TemplateBudgetError(f"the chat template rendered more than {max_chars} characters")
            out.append(piece)
    finally:
        sys.settrace(old)
    return "".join(out)
