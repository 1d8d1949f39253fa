"""ONNX converters, part 2: convolution, matrix products, pooling, normalization, resize.

Gemm and MatMul with a constant weight become `aten.linear(x, W[out, in], b)` with W laid
out (transposed) at load time, and Conv becomes `aten.conv2d` (1-D/3-D alike): the shapes
`fake-quant` and `convert` quantize. Padding that torch cannot express in the op itself
(asymmetric pads, SAME_* auto_pad) becomes an explicit `aten.pad` before it. Pooling with
asymmetric pads or dilated average pooling uses a general sum / count form.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .onnx_qdq import weight
from .onnx_values import Const, QWeight, check_size, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial(n, x, min_rank=3):
    k = x.dim() - 2
    if x.dim() < min_rank or k not in (1, 2, 3):
        raise n.error(f"input of rank {x.dim()} is not supported (1 to 3 spatial dimensions)")
    return k


def _pads(n, sizes, kernel, strides, dilations):
    """ONNX pads [begin..., end...] with auto_pad resolved."""
    k = len(kernel)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, kk, s, d in zip(sizes, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (kk - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto == "VALID":
        return [0] * (2 * k)
    if auto != "NOTSET":
        raise n.error(f"auto_pad={auto!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    pads = n.attr("pads", [0] * (2 * k))
    if len(pads) != 2 * k:
        raise n.error(f"pads {pads} should have {2 * k} values")
    return pads


def _torch_pad(begin, end):
    """ONNX begin/end pads -> F.pad's (last dim first) list."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _geometry(n, x, kernel):
    k = len(kernel)
    strides = n.attr("strides", [1] * k)
    dilations = n.attr("dilations", [1] * k)
    pads = _pads(n, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, pads[:k], pads[k:]


# ---------------------------------------------------------------- convolution


@op("Conv", raw=True)
def conv(n, x, w, b=None):
    x, w, b = n.t(x), weight(n, w), n.t(b)
    k = _spatial(n, x)
    strides, dilations, begin, end = _geometry(n, x, list(w.shape[2:]))
    if begin != end or any(p < 0 for p in begin):
        x = F.pad(x, _torch_pad(begin, end))
        begin = [0] * k
    return _CONV[k](x, w, b, strides, begin, dilations, n.attr("group", 1))


@op("ConvTranspose", raw=True)
def conv_transpose(n, x, w, b=None):
    x, w, b = n.t(x), weight(n, w), n.t(b)
    k = _spatial(n, x)
    kernel = list(w.shape[2:])
    strides, dilations = n.attr("strides", [1] * k), n.attr("dilations", [1] * k)
    out_pad = n.attr("output_padding", [0] * k)
    groups = n.attr("group", 1)
    full = [s * (i - 1) + (kk - 1) * d + 1 for s, i, kk, d in zip(strides, x.shape[2:], kernel, dilations)]
    out_shape, auto = n.attr("output_shape"), n.attr("auto_pad", "NOTSET")
    if out_shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [i * s for i, s in zip(x.shape[2:], strides)]
    if out_shape is not None:
        out_shape = list(out_shape)[-k:]
        total = [f + p - o for f, p, o in zip(full, out_pad, out_shape)]
        upper = auto == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - bb for t, bb in zip(total, begin)]
    elif auto == "VALID":
        begin = end = [0] * k
    else:
        pads = n.attr("pads", [0] * (2 * k))
        begin, end = pads[:k], pads[k:]
    if begin == end and all(p >= 0 for p in begin) and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        return _CONV_T[k](x, w, b, strides, begin, out_pad, groups, dilations)
    y = _CONV_T[k](x, w, None, strides, 0, 0, groups, dilations)  # full output, then crop / pad
    y = F.pad(y, _torch_pad([-bb for bb in begin], [p - e for p, e in zip(out_pad, end)]))
    return y if b is None else y + b.reshape(-1, *([1] * k))


@op("Gemm", raw=True)
def gemm(n, a, b, c=None):
    a = n.t(a)
    if n.attr("transA", 0):
        a = a.t()
    alpha, beta, trans_b = n.attr("alpha", 1.0), n.attr("beta", 1.0), n.attr("transB", 0)
    if isinstance(b, (Const, QWeight)) and a.dtype.is_floating_point:
        w = weight(n, b, transpose=not trans_b)
        if alpha == 1.0 and isinstance(c, Const) and c.value.dim() in (1, 2) and c.value.numel() == w.shape[0] \
                and (c.value.dim() == 1 or c.value.shape[0] == 1):
            bias = n.t(c) if (beta == 1.0 and c.value.dim() == 1) else \
                n.derived(c, "bias", lambda: (beta * c.value).reshape(-1).to(c.value.dtype))
            return F.linear(a, w, bias)
        y = F.linear(a, w)
    else:
        b = n.t(b)
        y = torch.matmul(a, b.t() if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        c = n.t(c)
        y = y + (c if beta == 1.0 else beta * c).to(y.dtype)
    return y


@op("MatMul", raw=True)
def matmul(n, a, b):
    a = n.t(a)
    if isinstance(b, (Const, QWeight)) and a.dtype.is_floating_point and a.dim() >= 1:
        rank = b.value.dim() if isinstance(b, Const) else b.q.dim()
        if rank == 2:
            return F.linear(a, weight(n, b, transpose=True))
    return torch.matmul(a, n.t(b))


# ---------------------------------------------------------------- pooling


def _pool_out(size, k, s, d, b, e, ceil):
    span = size + b + e - ((k - 1) * d + 1)
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + b:  # a last window starting in the end padding is dropped
        out -= 1
    return out


@op("MaxPool")
def max_pool(n, x):
    k = _spatial(n, x)
    kernel = n.attr("kernel_shape")
    strides, dilations, begin, end = _geometry(n, x, kernel)
    ceil = bool(n.attr("ceil_mode", 0))
    want_idx = n.n_out > 1 and n.proto.output[1]
    dtype = x.dtype
    x = x if dtype.is_floating_point else x.double()
    simple = begin == end and all(2 * p <= kk for p, kk in zip(begin, kernel))
    if not simple:
        if want_idx:
            raise n.error("the Indices output with asymmetric or large pads is not supported")
        outs = [_pool_out(i, kk, s, d, b, e, ceil) for i, kk, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begin, end)]
        extra = [max(0, (o - 1) * s + (kk - 1) * d + 1 - (i + b + e))
                 for o, s, kk, d, i, b, e in zip(outs, strides, kernel, dilations, x.shape[2:], begin, end)]
        x = F.pad(x, _torch_pad(begin, [e + ex for e, ex in zip(end, extra)]), value=-math.inf)
        begin, ceil = [0] * k, False
    y = _MAXPOOL[k](x, kernel, strides, begin, dilations, ceil_mode=ceil, return_indices=bool(want_idx))
    if not want_idx:
        return y.to(dtype)
    y, idx = y
    plane = math.prod(x.shape[2:])
    if n.attr("storage_order", 0):
        if k != 2:
            raise n.error("storage_order=1 is only supported for 2-D pooling")
        h, w = x.shape[2:]
        idx = (idx // w) + (idx % w) * h
    nc = torch.arange(x.shape[0] * x.shape[1], dtype=torch.int64).reshape(x.shape[0], x.shape[1], *([1] * k))
    return y.to(dtype), idx + nc * plane


@op("AveragePool")
def avg_pool(n, x):
    k = _spatial(n, x)
    kernel = n.attr("kernel_shape")
    strides, dilations, begin, end = _geometry(n, x, kernel)
    ceil, include = bool(n.attr("ceil_mode", 0)), bool(n.attr("count_include_pad", 0))
    if begin == end and all(d == 1 for d in dilations) and all(2 * p <= kk for p, kk in zip(begin, kernel)):
        return _AVGPOOL[k](x, kernel, strides, begin, ceil, include)
    # general form: sum of each window / number of counted elements in it
    sizes = list(x.shape[2:])
    outs = [_pool_out(i, kk, s, d, b, e, ceil) for i, kk, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end)]
    extra = [max(0, (o - 1) * s + (kk - 1) * d + 1 - (i + b + e))
             for o, s, kk, d, i, b, e in zip(outs, strides, kernel, dilations, sizes, begin, end)]
    ones = torch.ones(1, 1, *sizes, dtype=x.dtype)
    mask = F.pad(F.pad(ones, _torch_pad(begin, end), value=float(include)), _torch_pad([0] * k, extra))
    xp = F.pad(x, _torch_pad(begin, [e + ex for e, ex in zip(end, extra)]))
    channels = x.shape[1]
    sums = _CONV[k](xp, torch.ones(channels, 1, *kernel, dtype=x.dtype), None, strides, 0, dilations, channels)
    counts = _CONV[k](mask, torch.ones(1, 1, *kernel, dtype=x.dtype), None, strides, 0, dilations)
    return sums / counts


@op("GlobalAveragePool")
def global_avg_pool(n, x):
    return torch.mean(x, list(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(n, x):
    return torch.amax(x, list(range(2, x.dim())), keepdim=True)


@op("LRN")
def lrn(n, x):
    size = n.attr("size")
    alpha, beta, bias = n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1, 1)
    sq = F.pad(sq, (0, 0, 0, 0, (size - 1) // 2, size // 2))
    window = F.avg_pool3d(sq, (size, 1, 1), stride=1).reshape(x.shape) * size
    return x / (bias + alpha / size * window) ** beta


# ---------------------------------------------------------------- normalization


def _bcast(t, x, axis=1):
    return t.reshape(-1, *([1] * (x.dim() - axis - 1)))


@op("BatchNormalization")
def batch_norm(n, x, scale, bias, mean, var):
    eps = n.attr("epsilon", 1e-5)
    if not n.attr("training_mode", 0):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    momentum = n.attr("momentum", 0.9)
    dims = [0] + list(range(2, x.dim()))
    cur_mean, cur_var = x.mean(dims), x.var(dims, unbiased=False)
    y = (x - _bcast(cur_mean, x)) / torch.sqrt(_bcast(cur_var, x) + eps) * _bcast(scale, x) + _bcast(bias, x)
    return y, mean * momentum + cur_mean * (1 - momentum), var * momentum + cur_var * (1 - momentum)


@op("LayerNormalization")
def layer_norm(n, x, scale, bias=None):
    axis, eps = n.attr("axis", -1), n.attr("epsilon", 1e-5)
    axis = axis % x.dim()
    normalized = list(x.shape[axis:])
    if n.n_out == 1 and list(scale.shape) == normalized and (bias is None or list(bias.shape) == normalized):
        return F.layer_norm(x, normalized, scale, bias, eps)
    dims = list(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt((x - mean).pow(2).mean(dims, keepdim=True) + eps)
    y = (x - mean) * inv_std * scale
    y = y if bias is None else y + bias
    return (y, mean, inv_std)[: n.n_out]


@op("InstanceNormalization")
def instance_norm(n, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


@op("GroupNormalization")
def group_norm(n, x, scale, bias):
    groups, eps = n.attr("num_groups"), n.attr("epsilon", 1e-5)
    channels = x.shape[1]
    if n.opset < 21:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, eps)


@op("Dropout", raw=True)
def dropout(n, x, ratio=None, training=None):
    x = n.t(x)
    if training is not None and any(n.ints(training, "training_mode")):
        if ratio is None or n.floats(ratio, "ratio")[0] != 0.0:
            raise n.error("training-mode Dropout (random masks) is not supported; export the model in eval mode")
    return (x, torch.ones_like(x, dtype=torch.bool))[: max(n.n_out, 1)]


# ---------------------------------------------------------------- resize


def _source_coords(mode, out_len, in_len, scale, roi):
    """Input coordinate of every output index along one axis (ONNX Resize's formulas;
    `width` is the real-valued output length scale * in_len, `out_len` its integer part)."""
    y = np.arange(out_len, dtype=np.float64)
    width = scale * in_len
    if mode == "align_corners":
        return np.zeros(out_len) if width == 1 else y * (in_len - 1) / (width - 1)
    if mode == "asymmetric":
        return y / scale
    if mode == "pytorch_half_pixel":
        return np.full(out_len, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / width)
        return offset + (y + 0.5) / scale - 0.5
    if mode == "tf_crop_and_resize":
        start, end = roi
        if width == 1:
            return np.full(out_len, (end - start) * (in_len - 1) / 2 + start * (in_len - 1))
        return y * (end - start) * (in_len - 1) / (width - 1) + start * (in_len - 1)
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def _nearest(coords, rule):
    floor = np.floor(coords)
    frac = coords - floor
    up = {"round_prefer_floor": frac > 0.5, "round_prefer_ceil": frac >= 0.5, "floor": np.zeros_like(frac, bool),
          "ceil": frac > 0}[rule]
    return floor + up


@op("Resize", raw=True)
def resize(n, x, roi=None, scales=None, sizes=None):
    x = n.t(x)
    mode, ctm = n.attr("mode", "nearest"), n.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear") or n.attr("antialias", 0):
        raise n.error(f"mode={mode!r}{' with antialias' if n.attr('antialias', 0) else ''} is not supported "
                      "(supported: nearest, linear without antialias)")
    rank = x.dim()
    axes = [a % rank for a in n.attr("axes", list(range(rank)))]
    scales = n.floats(scales, "scales") if scales is not None and (not isinstance(scales, Const) or scales.value.numel()) else None
    sizes = n.ints(sizes, "sizes") if sizes is not None else None
    roi = n.floats(roi, "roi") if roi is not None and isinstance(roi, Const) and roi.value.numel() else None
    if sizes:
        factor = [s / x.shape[a] for s, a in zip(sizes, axes)]
        policy = n.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            f = min(factor) if policy == "not_larger" else max(factor)
            factor, sizes = [f] * len(axes), [int(f * x.shape[a] + 0.5) for a in axes]
    elif scales:
        factor, sizes = scales, [int(s * x.shape[a]) for s, a in zip(scales, axes)]
    else:
        raise n.error("one of scales and sizes must be given")
    check_size(n, [*x.shape[:2], *sizes])
    out = x if x.dtype.is_floating_point else x.double()
    for i, (a, size, f) in enumerate(zip(axes, sizes, factor)):
        if size == x.shape[a] and f == 1.0 and ctm != "tf_crop_and_resize":
            continue
        r = (roi[i], roi[i + len(axes)]) if roi else (0.0, 1.0)
        coords = _source_coords(ctm, size, x.shape[a], f, r)
        out = _resize_axis(out, a, coords, mode, n.attr("nearest_mode", "round_prefer_floor"))
        if ctm == "tf_crop_and_resize":
            outside = torch.from_numpy((coords < 0) | (coords > x.shape[a] - 1)).reshape(-1, *([1] * (rank - a - 1)))
            out = torch.where(outside, torch.tensor(n.attr("extrapolation_value", 0.0), dtype=out.dtype), out)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _resize_axis(x, axis, coords, mode, rule):
    last = x.shape[axis] - 1
    if mode == "nearest":
        idx = np.clip(_nearest(coords, rule), 0, last).astype(np.int64)
        return x.index_select(axis, torch.from_numpy(idx))
    lo = np.floor(coords)
    w = torch.from_numpy(coords - lo).to(x.dtype).reshape(-1, *([1] * (x.dim() - axis - 1)))
    i0 = torch.from_numpy(np.clip(lo, 0, last).astype(np.int64))
    i1 = torch.from_numpy(np.clip(lo + 1, 0, last).astype(np.int64))
    return x.index_select(axis, i0) * (1 - w) + x.index_select(axis, i1) * w
