"""ONNX converters, part 3: layout, indexing, shapes, casts and constants.

Shapes computed from tensor sizes (`Shape`, then Gather / Slice / Concat / Unsqueeze /
Squeeze / Cast / integer arithmetic on them) stay `Dims` of Python ints and SymInts, so
`Reshape(x, Concat(Shape(x)[0], [-1]))` traces as `aten.reshape(x, [s0, -1])` with a
dynamic batch. Everything else maps to the ATen op of the same meaning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .onnx_values import Const, Dims, check_size, concrete, dtype_of, is_shape, op

# ---------------------------------------------------------------- shapes


def _shape_range(n, rank):
    start, end = n.attr("start", 0), n.attr("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return start, end


@op("Shape", raw=True)
def shape(n, x):
    if isinstance(x, Dims):
        sizes = () if x.scalar else (len(x.items),)
    else:
        sizes = tuple(n.t(x).shape)
    start, end = _shape_range(n, len(sizes))
    return Dims(sizes[start:end])


@op("Size", raw=True)
def size(n, x):
    return Dims((math.prod(n.t(x).shape),), scalar=True)


@op("Identity", raw=True)
def identity(n, x):
    return x


@op("Reshape", raw=True)
def reshape(n, x, shape):
    x, target = n.t(x), n.ints(shape, "shape")
    if not n.attr("allowzero", 0):
        target = [x.shape[i] if (isinstance(d, int) and d == 0) else d for i, d in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(n, x):
    axis = n.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    if axis == 1 and x.dim() >= 2:
        return torch.flatten(x, 1)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(n, x):
    return x.permute(n.attr("perm", list(range(x.dim()))[::-1]))


def _axes(n, v):
    """Axes from the axes input (opset 13+) or attribute; None if absent."""
    return n.ints(v, "axes") if n.opset >= 13 else n.attr("axes")


def _normalize(n, axes, rank):
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        raise n.error(f"axes {axes} are out of range or repeated for rank {rank}")
    return sorted(a % rank for a in axes)


@op("Squeeze", raw=True)
def squeeze(n, x, axes=None):
    if is_shape(x) and not x.scalar and len(x.items) == 1:
        return Dims(x.items, scalar=True)
    x = n.t(x)
    axes = _axes(n, axes)
    dims = _normalize(n, axes, x.dim()) if axes is not None else [i for i, s in enumerate(x.shape) if s == 1]
    if any(x.shape[d] != 1 for d in dims):
        raise n.error(f"cannot squeeze axes {dims} of shape {list(x.shape)}")
    return x.squeeze(dims) if dims else x


@op("Unsqueeze", raw=True)
def unsqueeze(n, x, axes=None):
    if is_shape(x) and x.scalar:
        return Dims(x.items)
    x = n.t(x)
    axes = _axes(n, axes)
    if axes is None:
        raise n.error("axes are required")
    for d in _normalize(n, axes, x.dim() + len(axes)):
        x = x.unsqueeze(d)
    return x


@op("Concat", raw=True)
def concat(n, *xs):
    axis = n.attr("axis")
    if any(is_shape(x) for x in xs) and all(
            is_shape(x) and not x.scalar or isinstance(x, Const) and x.value.dim() == 1 and x.value.dtype == torch.int64
            for x in xs):
        return Dims(tuple(d for x in xs for d in (x.items if isinstance(x, Dims) else n.ints(x))))
    ts = [n.t(x) for x in xs]
    return torch.cat(ts, axis)


@op("Split", raw=True)
def split(n, x, sizes=None):
    x = n.t(x)
    axis = n.attr("axis", 0) % x.dim()
    sizes = n.ints(sizes, "split") if sizes is not None else n.attr("split")
    length = x.shape[axis]
    if not sizes:
        parts = n.attr("num_outputs", n.n_out)
        chunk = -(-length // parts)
        sizes = [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
    if sum(sizes) != length or any(s < 0 for s in sizes):
        raise n.error(f"split sizes {sizes} do not add up to {length}")
    return tuple(torch.split(x, sizes, axis))


@op("Slice", raw=True)
def slice_(n, x, starts, ends, axes=None, steps=None):
    starts, ends = n.ints(starts, "starts"), n.ints(ends, "ends")
    axes = n.ints(axes, "axes") if axes is not None else list(range(len(starts)))
    steps = n.ints(steps, "steps") if steps is not None else [1] * len(starts)
    if is_shape(x) and not x.scalar and axes in ([0], [-1]):
        return Dims(tuple(x.items[slice(starts[0], ends[0], steps[0])]))
    x = n.t(x)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % x.dim()
        if step == 0:
            raise n.error("steps must not be 0")
        if step > 0:
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        else:  # torch has no negative steps: slice the flipped tensor
            size = x.shape[axis]
            r = range(*slice(start, end, step).indices(size))
            flipped = slice(size - 1 - r.start, size - 1 - r.start + len(r) * -step, -step) if len(r) else slice(0, 0)
            x = x.flip(axis)[tuple([slice(None)] * axis + [flipped])]
    return x


def _positive(n, idx, size):
    return torch.where(idx < 0, idx + size, idx)


@op("Gather", raw=True)
def gather(n, data, indices):
    axis = n.attr("axis", 0)
    if is_shape(data) and not data.scalar and isinstance(indices, Const):
        items = [data.items[i] for i in n.ints(indices)]
        return Dims(tuple(items), scalar=indices.value.dim() == 0)
    data, idx = n.t(data), n.t(indices)
    axis = axis % data.dim()
    idx = _positive(n, idx.long(), data.shape[axis])
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape([*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]])


@op("GatherElements")
def gather_elements(n, data, indices):
    axis = n.attr("axis", 0) % data.dim()
    return torch.gather(data, axis, _positive(n, indices.long(), data.shape[axis]))


@op("Expand", static={1: "ints"})
def expand(n, x, shape):
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + list(shape)
    out = [a if (isinstance(b, int) and b == 1) else b for a, b in zip(xs, ss)]
    check_size(n, out)
    return x.reshape(xs).expand(out)


@op("Tile", static={1: "ints"})
def tile(n, x, repeats):
    check_size(n, [s * r for s, r in zip(x.shape, repeats)])
    return x.repeat(repeats)


@op("Trilu", raw=True)
def trilu(n, x, k=None):
    k = n.ints(k, "k")[0] if k is not None else 0
    return torch.triu(n.t(x), k) if n.attr("upper", 1) else torch.tril(n.t(x), k)


@op("DepthToSpace")
def depth_to_space(n, x):
    bs = n.attr("blocksize")
    b, c, h, w = x.shape
    if n.attr("mode", "DCR") == "DCR":
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


@op("SpaceToDepth")
def space_to_depth(n, x):
    bs = n.attr("blocksize")
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


# ---------------------------------------------------------------- padding


def _pad_index(i, size, mode):
    if mode == "edge":
        return min(max(i, 0), size - 1)
    if mode == "wrap":
        return i % size
    period = 2 * (size - 1)  # reflect
    i = abs(i) % period if period else 0
    return period - i if i >= size else i


@op("Pad", raw=True)
def pad(n, x, pads, value=None, axes=None):
    x = n.t(x)
    rank, mode = x.dim(), n.attr("mode", "constant")
    pads = n.ints(pads, "pads")
    axes = [a % rank for a in n.ints(axes, "axes")] if axes is not None else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise n.error(f"pads {pads} should have {2 * len(axes)} values")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    check_size(n, [s + b + e for s, b, e in zip(x.shape, begin, end)])
    if mode == "constant":
        flat = []
        for b, e in zip(reversed(begin), reversed(end)):
            flat += [b, e]
        if value is None or isinstance(value, (Const, Dims)):
            fill = 0 if value is None else (n.floats(value) if x.dtype.is_floating_point else n.ints(value))[0]
            return F.pad(x, flat, value=fill)
        border = F.pad(torch.zeros_like(x, dtype=torch.bool), flat, value=True)  # a run-time value
        return torch.where(border, n.t(value).to(x.dtype), F.pad(x, flat))
    if mode not in ("reflect", "edge", "wrap"):
        raise n.error(f"mode={mode!r} is not one of constant, reflect, edge, wrap")
    for a, (b, e) in enumerate(zip(begin, end)):
        if b or e:
            size = x.shape[a]
            idx = torch.tensor([_pad_index(i, size, mode) for i in range(-b, size + e)], dtype=torch.int64)
            x = x.index_select(a, idx)
    return x


# ---------------------------------------------------------------- types and constants


@op("Cast", raw=True)
def cast(n, x):
    dtype = dtype_of(n.attr("to"), f"Cast node {n.name!r}: target type")
    if is_shape(x) and dtype in (torch.int64, torch.int32):
        return x
    return n.t(x).to(dtype)


@op("CastLike")
def cast_like(n, x, like):
    return x.to(like.dtype)


@op("Constant")
def constant(n):
    for key, make in (("value", lambda v: v), ("value_float", lambda v: torch.tensor(v, dtype=torch.float32)),
                      ("value_floats", lambda v: torch.tensor(v, dtype=torch.float32)),
                      ("value_int", lambda v: torch.tensor(v, dtype=torch.int64)),
                      ("value_ints", lambda v: torch.tensor(v, dtype=torch.int64))):
        if key in n.attrs:
            return make(n.attr(key))
    raise n.error(f"only value, value_float(s) and value_int(s) are supported, not {sorted(n.attrs)}")


@op("ConstantOfShape", raw=True)
def constant_of_shape(n, shape):
    dims = n.ints(shape, "shape")
    value = n.attr("value")
    check_size(n, dims)
    if value is None:
        return torch.zeros(dims, dtype=torch.float32)
    with concrete():
        fill = value.reshape(-1)[0].item()
    return torch.full(dims, fill, dtype=value.dtype)


def _scalar(n, v, what):
    if isinstance(v, Dims) and v.scalar:
        return v.items[0], v.dtype
    if isinstance(v, Const) and v.value.numel() == 1:
        with concrete():
            return v.value.item(), v.value.dtype
    raise n.error(f"{what} must be a constant scalar or computed from shapes")


@op("Range", raw=True)
def range_(n, start, limit, delta):
    (start, dtype), (limit, _), (delta, _) = (_scalar(n, v, w) for v, w in
                                              ((start, "start"), (limit, "limit"), (delta, "delta")))
    if delta == 0:
        raise n.error("delta must not be 0")
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        check_size(n, [max(math.ceil((limit - start) / delta), 0)])
    return torch.arange(start, limit, delta, dtype=dtype)
