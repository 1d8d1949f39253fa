"""ONNX converters, part 1: elementwise arithmetic, activations, comparisons, reductions.

Each converter computes its ONNX op with torch ops (numpy broadcasting is torch's), so
tracing gives the ATen op a PyTorch model would: Relu -> aten.relu, Clip -> aten.clamp,
HardSwish -> aten.hardswish, Gelu -> aten.gelu, Softmax -> aten.softmax, ... Integer
arithmetic on shapes (`Dims`) stays in Python so that dynamic sizes survive.
Parts 2 and 3: `onnx_ops_nn.py` (conv, pooling, normalization, resize),
`onnx_ops_shape.py` (layout, indexing, shapes, casts, constants).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from .onnx_values import Const, Dims, is_shape, op

# ---------------------------------------------------------------- binary arithmetic


def _trunc_div(a, b):
    return operator.floordiv(a, b) if (a >= 0) == (b > 0) or a % b == 0 else -(abs(a) // abs(b))


_DIMS_OPS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _trunc_div}


def _dims_binary(n, a, b):
    """Integer arithmetic on shape values, kept in Python; None if an input is a tensor."""
    if not any(is_shape(v) for v in (a, b)) or not all(is_shape(v) or isinstance(v, Const) for v in (a, b)):
        return None
    items, scalar = [], True
    for v in (a, b):
        if isinstance(v, Const):
            if v.value.dtype not in (torch.int64, torch.int32) or v.value.dim() > 1:
                return None
            items.append(n.ints(v))
            scalar = scalar and v.value.dim() == 0
        else:
            items.append(list(v.items))
            scalar = scalar and v.scalar
    la, lb = items
    if len(la) != len(lb) and 1 not in (len(la), len(lb)):
        raise n.error(f"shapes of length {len(la)} and {len(lb)} do not broadcast")
    size = max(len(la), len(lb))
    la, lb = (la * size if len(la) == 1 else la), (lb * size if len(lb) == 1 else lb)
    return Dims(tuple(_DIMS_OPS[n.op_type](x, y) for x, y in zip(la, lb)), scalar)


def _div(a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc").to(a.dtype)


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div}


@op("Add", "Sub", "Mul", "Div", raw=True)
def arithmetic(n, a, b):
    dims = _dims_binary(n, a, b)
    if dims is not None:
        return dims
    a, b = n.t(a), n.t(b)
    if a.dtype != b.dtype:
        raise n.error(f"inputs have different types {a.dtype} and {b.dtype}")
    return _BINARY[n.op_type](a, b)


@op("Pow")
def pow_(n, x, y):
    if x.dtype.is_floating_point and not y.dtype.is_floating_point:
        y = y.to(x.dtype)
    return torch.pow(x, y).to(x.dtype)


@op("Mod")
def mod(n, a, b):
    if n.attr("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)  # the sign of the divisor (Python's %); floats as in opset 28


def _variadic(fn):
    def convert(n, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return convert


op("Sum")(_variadic(torch.add))
op("Max")(_variadic(torch.maximum))
op("Min")(_variadic(torch.minimum))


@op("Mean")
def mean(n, *xs):
    return _variadic(torch.add)(n, *xs) / len(xs)


# ---------------------------------------------------------------- comparisons and logic

for _name, _fn in {"Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
                   "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor}.items():
    op(_name)(lambda n, a, b, _fn=_fn: _fn(a, b))


@op("Not")
def not_(n, x):
    return torch.logical_not(x)


@op("Where")
def where(n, cond, x, y):
    return torch.where(cond, x, y)


@op("IsNaN")
def isnan(n, x):
    return torch.isnan(x)


@op("IsInf")
def isinf(n, x):
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    return torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool)


# ---------------------------------------------------------------- unary math and activations

_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Erf": torch.erf, "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Sign": torch.sign, "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish,
    "Reciprocal": torch.reciprocal, "Softplus": F.softplus,
}
for _name, _fn in _UNARY.items():
    op(_name)(lambda n, x, _fn=_fn: _fn(x))


@op("LeakyRelu")
def leaky_relu(n, x):
    return F.leaky_relu(x, n.attr("alpha", 0.01))


@op("Elu")
def elu(n, x):
    return F.elu(x, n.attr("alpha", 1.0))


@op("Celu")
def celu(n, x):
    return F.celu(x, n.attr("alpha", 1.0))


@op("Selu")
def selu(n, x):
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("ThresholdedRelu")
def thresholded_relu(n, x):
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(n, x):
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return F.hardsigmoid(x)
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@op("Gelu")
def gelu(n, x):
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@op("PRelu")
def prelu(n, x, slope):
    return torch.where(x < 0, x * slope, x)


@op("Clip", raw=True)
def clip(n, x, lo=None, hi=None):
    x = n.t(x)
    bounds = []
    for v in (lo, hi):
        if isinstance(v, Const) and v.value.numel() == 1:
            bounds.append((n.floats(v) if v.value.dtype.is_floating_point else n.ints(v))[0])
        else:
            bounds.append(n.t(v))
    lo, hi = bounds
    if lo is None and hi is None:
        return x
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        out = x if lo is None else torch.maximum(x, lo if isinstance(lo, torch.Tensor) else torch.tensor(lo, dtype=x.dtype))
        return out if hi is None else torch.minimum(out, hi if isinstance(hi, torch.Tensor) else torch.tensor(hi, dtype=x.dtype))
    if lo is not None and hi is not None and lo > hi:  # ONNX: min > max gives max everywhere
        return torch.full_like(x, hi)
    if lo == 0 and hi is None:
        return torch.relu(x)
    return torch.clamp(x, lo, hi)


# ---------------------------------------------------------------- softmax family


def _axis(n, x, default):
    axis = n.attr("axis", default)
    if not -max(x.dim(), 1) <= axis < max(x.dim(), 1):
        raise n.error(f"axis {axis} is out of range for a rank-{x.dim()} input")
    return axis


@op("Softmax")
def softmax(n, x):
    return torch.softmax(x, _axis(n, x, -1))


@op("LogSoftmax")
def log_softmax(n, x):
    return torch.log_softmax(x, _axis(n, x, -1))


@op("Hardmax")
def hardmax(n, x):
    axis = _axis(n, x, -1)
    return F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


# ---------------------------------------------------------------- reductions

_REDUCE = {
    "ReduceSum": (lambda x, d, k: torch.sum(x, d, keepdim=k), 0.0),
    "ReduceMean": (lambda x, d, k: torch.mean(x, d, keepdim=k), math.nan),
    "ReduceMax": (lambda x, d, k: torch.amax(x, d, keepdim=k) if x.dtype != torch.bool else x.any(d, keepdim=k), -math.inf),
    "ReduceMin": (lambda x, d, k: torch.amin(x, d, keepdim=k) if x.dtype != torch.bool else x.all(d, keepdim=k), math.inf),
    "ReduceProd": (lambda x, d, k: _prod(x, d, k), 1.0),
    "ReduceL1": (lambda x, d, k: torch.sum(x.abs(), d, keepdim=k), 0.0),
    "ReduceL2": (lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)), 0.0),
    "ReduceSumSquare": (lambda x, d, k: torch.sum(x * x, d, keepdim=k), 0.0),
    "ReduceLogSum": (lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)), -math.inf),
    "ReduceLogSumExp": (lambda x, d, k: torch.logsumexp(x, d, keepdim=k), -math.inf),
}
_AXES_INPUT_SINCE = {"ReduceSum": 13}  # the others take axes as an input from opset 18


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


@op(*_REDUCE, raw=True)
def reduce(n, x, axes=None):
    x = n.t(x)
    if n.opset >= _AXES_INPUT_SINCE.get(n.op_type, 18):
        axes = n.ints(axes, "axes") if axes is not None else []
    else:
        axes = n.attr("axes", [])
    keep = bool(n.attr("keepdims", 1))
    if not axes:
        if n.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    rank = max(x.dim(), 1)
    if any(not -rank <= a < rank for a in axes):
        raise n.error(f"axes {axes} out of range for a rank-{x.dim()} input")
    dims = sorted({a % rank for a in axes}) if x.dim() else []
    fn, empty = _REDUCE[n.op_type]
    if x.dim() and any(x.shape[d] == 0 for d in dims):  # ONNX reduces an empty set to the identity
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keep else \
            [s for d, s in enumerate(x.shape) if d not in dims]
        if x.dtype == torch.bool:
            empty = n.op_type == "ReduceMin"  # all() of nothing is True, any() False
        return torch.full(shape, empty, dtype=x.dtype)
    if not dims:
        return x
    return fn(x, dims, keep)


@op("ArgMax", "ArgMin")
def argmax(n, x):
    axis, keep = _axis(n, x, 0), bool(n.attr("keepdims", 1))
    fn = torch.argmax if n.op_type == "ArgMax" else torch.argmin
    if n.attr("select_last_index", 0):
        axis = axis % x.dim()
        return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
    return fn(x, axis, keepdim=keep)


@op("CumSum", static={1: "ints"})
def cumsum(n, x, axis):
    axis = axis[0]
    if n.attr("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if n.attr("exclusive", 0):
        out = out - x
    return out.flip(axis) if n.attr("reverse", 0) else out


@op("Einsum")
def einsum(n, *xs):
    return torch.einsum(n.attr("equation").replace(" ", ""), *xs)
