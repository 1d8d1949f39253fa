"""The `qc` operator namespace: quantization ops and integer compute ops.

Every op here is a `torch.library` custom op with a fake (meta) kernel, so graphs holding
them trace with `torch.export`, and a torch implementation that is the *reference*: every
backend kernel must match it bit for bit on integer outputs.

Quantization (affine, per tensor, per channel via broadcasting, or per group):

    quantize(x)      q = clamp(round_half_even(x / s) + z, qmin, qmax)        (int8)
    dequantize(q)    x = (q - z) * s                                          (float32)
    fake_quant(x)    dequantize(quantize(x)) in float, straight-through gradient inside
                     [qmin, qmax] (zero outside), the float ops exactly those above; when
                     `s` or `z` require grad, their LSQ/LSQ+ gradients (see the backward)

`s` and `z` broadcast against `x`; with `group_size > 0` their last dimension holds one
value per group of `group_size` consecutive elements of `x`'s last dimension (the last
group may be shorter: a ragged tail is allowed).

Integer compute ops take int8 tensors and accumulate exactly in int32:

    linear_int(x, zx, w, b)        acc[..., n] = sum_k (x[..., k] - zx) * w[n, k] + b[n]
    conv2d_int(x, zx, w, b, ...)   the same for NCHW convolution (padding holds zx, i.e. 0.0)
    matmul_int(a, za, b, zb)       acc = (a - za) @ (b - zb)  (activation x activation)

and the dyadic requantizer brings an int32 accumulator back to int8 with integer ops only:

    requantize(acc, m, sh, z)      q = clamp(((acc * m + 2^(sh-1)) >> sh) + z, qmin, qmax)

computed in int64 with an arithmetic right shift, i.e. round half towards +infinity of
acc * m / 2^sh; `m` (int32 in [2^30, 2^31)) and `sh` (1..62) are per tensor (one element) or
per channel along `axis`. `m * 2^-sh` approximates the real rescale s_x * s_w / s_out to
31 significant bits (see `dyadic`).

`linear_int_grouped` serves weights with one scale per group (e.g. W4A8 with group 128): it
forms the exact int32 partial sum of every group, then combines them in float32:
y[..., n] = sum_g acc[..., n, g] * (s_x * s_w[n, g]) + b[n], the sum taken in group order,
one float32 multiply and one float32 add per group (what the kernels compute).

`linear_weight_only` keeps activations float (weight-only recipes such as "w4g128", for
memory-bound decoding): y = x @ (w * s_w).T + b in float32, with `s_w` [N, 1] per channel
(`group_size` 0) or [N, G] per group; its outputs are compared within a float tolerance.

The torch kernels compute integer products in float64, which is exact for every value an
int8 x int8 accumulation of fewer than 2^37 terms can take.
"""

import math

import torch

_LIB = "qc"


def _expand_groups(t: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat per-group parameters along the last dim to the length of `x`'s last dim."""
    if group_size <= 0 or t.numel() == 1:
        return t
    return t.repeat_interleave(group_size, dim=-1)[..., : x.shape[-1]]


def _fq_core(x, scale, zero_point, quant_min, quant_max, group_size):
    s = _expand_groups(scale, x, group_size)
    z = _expand_groups(zero_point, x, group_size)
    q = torch.clamp(torch.round(x / s) + z, quant_min, quant_max)
    return q, s, z


# ---------------------------------------------------------------- quantization ops


@torch.library.custom_op("qc::fake_quant", mutates_args=())
def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    group_size: int = 0,
) -> torch.Tensor:
    q, s, z = _fq_core(x, scale, zero_point, quant_min, quant_max, group_size)
    return ((q - z) * s).to(x.dtype)


@fake_quant.register_fake
def _(x, scale, zero_point, quant_min, quant_max, group_size=0):
    return torch.empty_like(x)


def _fake_quant_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, group_size = inputs
    s = _expand_groups(scale, x, group_size)
    z = _expand_groups(zero_point, x, group_size)
    r = x / s
    v = torch.round(r) + z
    inside = (v >= quant_min) & (v <= quant_max)
    ctx.group_size = group_size
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # learned quantizer: LSQ / LSQ+
        # d y / d s: round(x/s) - x/s inside the grid, qmin - z below it, qmax - z above it;
        # d y / d z: 0 inside, -s outside (z cancels inside: y = round(x/s) * s)
        ds = torch.where(inside, torch.round(r) - r, torch.where(v < quant_min, quant_min - z, quant_max - z))
        ctx.save_for_backward(inside, ds, torch.where(inside, torch.zeros_like(s), -s), scale, zero_point)
    else:
        ctx.save_for_backward(inside)


def _sum_to_param(g: torch.Tensor, param: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reduce a per-element gradient to the shape of a (per tensor/channel/group) parameter."""
    if group_size > 0 and param.numel() > 1:
        groups = param.shape[-1]
        if groups * group_size != g.shape[-1]:  # a ragged last group: pad it with zeros
            g = torch.nn.functional.pad(g, (0, groups * group_size - g.shape[-1]))
        g = g.reshape(*g.shape[:-1], groups, group_size).sum(-1)
    return g.sum_to_size(param.shape)


def _fake_quant_backward(ctx, grad):
    inside, *lsq = ctx.saved_tensors
    gs = gz = None
    if lsq:  # LSQ gradients (Esser et al. 2020; offset as in LSQ+), unscaled: the trainer scales them
        ds, dz, scale, zero_point = lsq
        gs = _sum_to_param(grad * ds, scale, ctx.group_size) if ctx.needs_input_grad[1] else None
        gz = _sum_to_param(grad * dz, zero_point, ctx.group_size) if ctx.needs_input_grad[2] else None
    return grad * inside, gs, gz, None, None, None


fake_quant.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup)


@torch.library.custom_op("qc::quantize", mutates_args=())
def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    group_size: int = 0,
) -> torch.Tensor:
    q, _, _ = _fq_core(x, scale, zero_point, quant_min, quant_max, group_size)
    return q.to(torch.int8)


@quantize.register_fake
def _(x, scale, zero_point, quant_min, quant_max, group_size=0):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qc::dequantize", mutates_args=())
def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int = 0
) -> torch.Tensor:
    s = _expand_groups(scale, q, group_size)
    z = _expand_groups(zero_point, q, group_size)
    return ((q.to(torch.float32) - z) * s).to(torch.float32)


@dequantize.register_fake
def _(q, scale, zero_point, group_size=0):
    return torch.empty_like(q, dtype=torch.float32)


# ---------------------------------------------------------------- integer compute ops


def _exact_int32(acc64: torch.Tensor) -> torch.Tensor:
    return torch.round(acc64).to(torch.int32)


@torch.library.custom_op("qc::linear_int", mutates_args=())
def linear_int(
    x: torch.Tensor, x_zero_point: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    acc = torch.matmul(x.double() - x_zero_point, weight.double().t())
    if bias is not None:
        acc = acc + bias.double()
    return _exact_int32(acc)


@linear_int.register_fake
def _(x, x_zero_point, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.int32)


@torch.library.custom_op("qc::linear_int_grouped", mutates_args=())
def linear_int_grouped(
    x: torch.Tensor,
    x_zero_point: int,
    x_scale: float,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    k = x.shape[-1]
    groups = weight_scale.shape[-1]
    pad = groups * group_size - k
    xs = torch.nn.functional.pad(x.double() - x_zero_point, (0, pad))
    ws = torch.nn.functional.pad(weight.double(), (0, pad))
    xs = xs.reshape(*x.shape[:-1], groups, group_size)
    ws = ws.reshape(weight.shape[0], groups, group_size)
    acc = _exact_int32(torch.einsum("...gk,ngk->...ng", xs, ws))  # exact per-group sums
    terms = acc.to(torch.float32) * (weight_scale * x_scale)
    y = terms[..., 0]
    for g in range(1, groups):  # one float32 sum in group order, as the kernels add them
        y = y + terms[..., g]
    if bias is not None:
        y = y + bias
    return y


@linear_int_grouped.register_fake
def _(x, x_zero_point, x_scale, weight, weight_scale, group_size, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qc::linear_weight_only", mutates_args=())
def linear_weight_only(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    w = weight.to(torch.float32) * _expand_groups(weight_scale, weight, group_size)
    return torch.nn.functional.linear(x.to(torch.float32), w, bias)


@linear_weight_only.register_fake
def _(x, weight, weight_scale, group_size, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qc::conv2d_int", mutates_args=())
def conv2d_int(
    x: torch.Tensor,
    x_zero_point: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    acc = torch.nn.functional.conv2d(
        x.double() - x_zero_point,
        weight.double(),
        None if bias is None else bias.double(),
        stride,
        padding,
        dilation,
        groups,
    )
    return _exact_int32(acc)


@conv2d_int.register_fake
def _(x, x_zero_point, weight, bias, stride, padding, dilation, groups):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight.shape[0], oh, ow), dtype=torch.int32)


@torch.library.custom_op("qc::matmul_int", mutates_args=())
def matmul_int(a: torch.Tensor, a_zero_point: int, b: torch.Tensor, b_zero_point: int) -> torch.Tensor:
    return _exact_int32(torch.matmul(a.double() - a_zero_point, b.double() - b_zero_point))


@matmul_int.register_fake
def _(a, a_zero_point, b, b_zero_point):
    return torch.empty(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                       dtype=torch.int32, device=a.device)


@torch.library.custom_op("qc::requantize", mutates_args=())
def requantize(
    acc: torch.Tensor,
    multiplier: torch.Tensor,
    shift: torch.Tensor,
    zero_point: int,
    quant_min: int,
    quant_max: int,
    axis: int,
) -> torch.Tensor:
    m, sh = _along_axis(multiplier.long(), acc, axis), _along_axis(shift.long(), acc, axis)
    rounded = torch.bitwise_right_shift(acc.long() * m + torch.bitwise_left_shift(1, sh - 1), sh)
    return torch.clamp(rounded + zero_point, quant_min, quant_max).to(torch.int8)


@requantize.register_fake
def _(acc, multiplier, shift, zero_point, quant_min, quant_max, axis):
    return torch.empty_like(acc, dtype=torch.int8)


def _along_axis(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape a per-channel vector to broadcast along `axis` of `like` (per-tensor: as is)."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = t.numel()
    return t.reshape(shape)


# ---------------------------------------------------------------- helpers for passes


def dyadic(real_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positive real rescale factors into (multiplier, shift) with r ~= m * 2^-shift.

    m is an int32 in [2^30, 2^31) (31 significant bits), shift an int32 in 1..62.
    Raises ValueError when a factor is not finite, not positive or outside 2^-31..2^29.
    """
    values = real_scale.double().flatten().tolist()
    mults, shifts = [], []
    for r in values:
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"rescale factor {r} is not a positive finite number")
        frac, exp = math.frexp(r)  # r = frac * 2^exp, frac in [0.5, 1)
        m, sh = round(frac * (1 << 31)), 31 - exp
        if m == 1 << 31:
            m, sh = m >> 1, sh - 1
        if not 1 <= sh <= 62:
            raise ValueError(f"rescale factor {r} is outside the dyadic range 2^-31..2^29")
        mults.append(m)
        shifts.append(sh)
    return torch.tensor(mults, dtype=torch.int32), torch.tensor(shifts, dtype=torch.int32)


# ---------------------------------------------------------------- rotations


@torch.library.custom_op("qc::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, size: int) -> torch.Tensor:
    """Orthogonal Hadamard rotation y = x R of every block of `size` consecutive elements
    of the last dim (R = (H_m kron H_2^k) / sqrt(size), `qcompiler.hadamard`): online
    rotations that cannot be folded into weights (QuaRot)."""
    from .hadamard import hadamard_reference

    return hadamard_reference(x, size)


@hadamard.register_fake
def _(x, size):
    return torch.empty_like(x)


def _hadamard_backward(ctx, grad):
    """d x = d y R^T per block (R orthogonal), for training through online rotations: with
    R = (H_m kron H_p) / sqrt(n), d y R^T = H_m (d Y) H_p / sqrt(n) by the same butterflies."""
    from .hadamard import factor, hadamard_reference, small_matrix

    m, p = factor(ctx.size)
    t = hadamard_reference(grad.reshape(-1, m, p), p)
    if m > 1:
        t = torch.einsum("ca,bap->bcp", small_matrix(m).to(t.dtype), t) * (1.0 / math.sqrt(m))
    return t.reshape(grad.shape), None


def _hadamard_setup(ctx, inputs, output):
    ctx.size = inputs[1]


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


QUANT_OPS = (torch.ops.qc.fake_quant.default, torch.ops.qc.quantize.default, torch.ops.qc.dequantize.default)
INTEGER_OPS = (
    torch.ops.qc.linear_int.default,
    torch.ops.qc.linear_int_grouped.default,
    torch.ops.qc.conv2d_int.default,
    torch.ops.qc.matmul_int.default,
    torch.ops.qc.requantize.default,
)
