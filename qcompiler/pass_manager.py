"""Passes, their registry, textual pipelines and the pass manager.

A pass is a frozen dataclass registered under a kebab-case name; its fields are its
options (typed, with defaults) and its docstring is its help text. `run(gm, ctx)` rewrites
the IR in place and returns a `PassResult` saying what changed.

Pipeline text is `name(key=value,...)` joined by commas, e.g.
`fake-quant(w=4,a=8,granularity=group),calibrate(observer=mse),convert`. Values are coerced
by the field types; a tuple option takes `;`-separated items (`ops=linear;conv2d`).
`str(pipeline)` prints the canonical text: each pass with the options that differ from
their defaults, in field order, so canonical text parses and prints back identically.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import torch.fx

from .context import PassContext
from .errors import PassError, PipelineError, QCompilerError

_REGISTRY: dict[str, type["Pass"]] = {}


@dataclass
class PassResult:
    """What a pass did: whether the IR changed, a one-line summary, and details."""

    changed: bool
    summary: str = ""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass(abc.ABC):
    """Base class of every pass (subclasses are frozen dataclasses)."""

    name: typing.ClassVar[str] = ""

    @abc.abstractmethod
    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite `gm` in place; say what changed."""

    def options(self) -> dict:
        """Options that differ from their defaults, in field order."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = v
        return out

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name


def register(name: str):
    """Class decorator: make a frozen dataclass pass and register it under `name`."""

    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.name = name
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise PipelineError(f"pass name {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_passes() -> dict[str, type[Pass]]:
    from . import passes as _  # noqa: F401  (importing the package registers every pass)

    return dict(_REGISTRY)


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ";".join(_format_value(x) for x in v)
    return str(v)


def _coerce(pass_name: str, f: dataclasses.Field, text: str, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"option {f.name} of pass {pass_name}"
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if hint in (int, float, str):
            return hint(text)
        if origin is typing.Literal:
            if text not in args:
                raise ValueError(f"expected one of {', '.join(map(str, args))}")
            return text
        if origin is tuple:
            item = args[0]
            return tuple(item(x) for x in text.split(";") if x != "")
    except ValueError as e:
        raise PipelineError(f"{where}: cannot read {text!r}: {e}") from None
    raise PipelineError(f"{where} has a type the pipeline parser does not know: {hint}")


def make_pass(name: str, options: dict[str, str]) -> Pass:
    """Build a registered pass from its name and textual options."""
    reg = registered_passes()
    if name not in reg:
        close = difflib.get_close_matches(name, reg, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}.{hint} Passes: {', '.join(sorted(reg))}")
    cls = reg[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, text in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            valid = ", ".join(f"{k}: {_type_name(hints[k])}" for k in fields) or "none"
            raise PipelineError(f"pass {name} has no option {key!r}.{hint} Options: {valid}")
        kwargs[key] = _coerce(name, fields[key], text, hints[key])
    try:
        return cls(**kwargs)
    except QCompilerError as e:
        raise type(e)(f"pass {name}: {e}") from e


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in pipeline text {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise PipelineError(f"unclosed '(' in pipeline text {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_pipeline(text: str) -> list[Pass]:
    passes = []
    for item in _split_top(text.strip()):
        if not item:
            raise PipelineError(f"empty pass in pipeline text {text!r} (stray comma?)")
        name, _, rest = item.partition("(")
        name = name.strip()
        opts: dict[str, str] = {}
        if rest:
            if not rest.endswith(")"):
                raise PipelineError(f"pass {name!r}: options must end with ')' in {item!r}")
            for kv in _split_top(rest[:-1]):
                if not kv:
                    continue
                key, eq, value = kv.partition("=")
                if not eq:
                    raise PipelineError(f"pass {name}: option {kv!r} is not key=value")
                opts[key.strip()] = value.strip()
        passes.append(make_pass(name, opts))
    return passes


class PassManager:
    """Runs passes in order with instruments around each (see `qcompiler.instruments`)."""

    def __init__(self, passes: list[Pass], instruments: list | None = None):
        self.passes = list(passes)
        self.instruments = list(instruments or [])

    @classmethod
    def parse(cls, text: str, instruments: list | None = None) -> "PassManager":
        return cls(parse_pipeline(text), instruments)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> torch.fx.GraphModule:
        from .instruments import default_instruments

        ctx = ctx or PassContext()
        instruments = default_instruments(ctx) + self.instruments
        for inst in instruments:
            inst.run_start(gm, ctx, self)
        for i, p in enumerate(self.passes):
            before = [str(q) for q in self.passes[:i]]
            for inst in instruments:
                inst.before_pass(p, gm, ctx)
            try:
                result = p.run(gm, ctx)
                for inst in instruments:
                    inst.after_pass(p, gm, ctx, result)
            except Exception as e:
                for inst in instruments:
                    inst.failed_pass(p, gm, ctx, e)
                raise _pass_error(p, before, e) from e
            ctx.results.append((str(p), result))
        return gm


def _pass_error(p: Pass, before: list[str], e: Exception) -> PassError:
    node = getattr(e, "node", None)
    where = f" at node {node}" if node is not None else ""
    ran = ", ".join(before) if before else "none"
    msg = f"pass {p} failed{where}: {e}\n(passes run before it: {ran})"
    if not isinstance(e, QCompilerError):
        msg = f"pass {p} failed{where}: {type(e).__name__}: {e}\n(passes run before it: {ran})"
    return PassError(msg, pass_name=p.name, before=before, node=node)
