"""Sub-byte weight storage: which widths and group sizes the kernels take, and the packed layout.

Weights of b = 4 or 2 bits are stored L = 8 / b to a byte, along the reduction axis K of each
output row (a conv weight [O, C/g, KH, KW] is a row of R = C/g*KH*KW per output channel, in
that order), in *offset binary*: the stored lane value is u = w + 2^(b-1) in [0, 2^b). A row
is a sequence of blocks of S bytes (S = 16, or fewer for a short row: `span`) holding S*L
consecutive weights; lane h of byte j of a block holds the block's weight h*S + j:

    w[n, k]  =  ((p[n, (k // SL) * S + k % S] >> (((k % SL) // S) * b)) & (2^b - 1)) - 2^(b-1)

so S contiguous bytes unpack, with one shift and mask each time, into L runs of S consecutive
weights: a SIMD load of 16 bytes gives 16 consecutive weights per shift, in any integer width
(TVM may widen index arithmetic to int64, so no sign extension by shifts is used). A row is
zero-padded (w = 0) to whole blocks; `pad_to` pads it further (grouped kernels pad K to whole
groups). 8-bit weights stay int8, one a byte; 3, 5, 6 and 7-bit weights are stored as int8 too.

The integer widths in the IR are per layer (`node.meta["qc"]["w_bits"]`); `check_layer`
refuses a width or group size no kernel takes, or weights that do not fit their width.
"""

from __future__ import annotations

import numbers

import numpy as np

from qcompiler.errors import LoweringError

PACKED_BITS = (2, 4)  # stored 8/b to a byte
INT8_BITS = (3, 5, 6, 7, 8)  # stored one to a byte (int8)
GROUP_SIZES = (32, 64, 128)  # group-wise scales; 0 is one scale per output channel
SUPPORTED = "weights of 8, 4 or 2 bits (4 and 2 packed 2 and 4 to a byte) or 3, 5, 6, 7 bits stored as int8"


def lanes(bits: int) -> int:
    """Weights per stored byte."""
    return 8 // bits if bits in PACKED_BITS else 1


SPAN = 16  # bytes of a block: one 128-bit vector


def span(k: int, bits: int) -> int:
    """Bytes per block for a row of k weights (16, or one block for a shorter row)."""
    return min(SPAN, -(-k // lanes(bits)))


def pack(w: np.ndarray, bits: int, pad_to: int = 0) -> np.ndarray:
    """Pack an integer weight matrix [N, K] of `bits`-bit values along K (the layout above).

    Returns uint8 [N, bytes] for 2 and 4 bits (K padded to whole blocks of
    `span(max(K, pad_to), bits)` bytes), the int8 values zero-padded to `pad_to` otherwise.
    """
    w = np.asarray(w)
    n, k = w.shape
    width = max(k, pad_to)
    per = lanes(bits)
    if per == 1:
        out = np.zeros((n, width), np.int8)
        out[:, :k] = w
        return out
    s = span(width, bits)
    width = -(-width // (s * per)) * (s * per)
    u = np.full((n, width), 1 << (bits - 1), np.uint32)  # offset binary: 2^(b-1) is w = 0
    u[:, :k] = w.astype(np.int64) + (1 << (bits - 1))
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :, None]
    blocks = (u.reshape(n, width // (s * per), per, s) << shifts).sum(2, dtype=np.uint32)
    return blocks.reshape(n, width // per).astype(np.uint8)


def unpack(p: np.ndarray, bits: int, k: int, pad_to: int = 0) -> np.ndarray:
    """The inverse of `pack`: int8 [N, k] (for tests and debugging)."""
    per = lanes(bits)
    if per == 1:
        return np.asarray(p[:, :k], np.int8)
    s, idx = span(max(k, pad_to), bits), np.arange(k)
    byte = p[:, (idx // (s * per)) * s + idx % s].astype(np.int32)
    lane = ((idx % (s * per)) // s) * bits
    return (((byte >> lane) & ((1 << bits) - 1)) - (1 << (bits - 1))).astype(np.int8)


def check_layer(layer: str, bits: int, group: int = 0, values: np.ndarray | None = None) -> None:
    """Refuse a weight width, group size or weight values the kernels do not take."""
    if bits not in PACKED_BITS + INT8_BITS:
        raise LoweringError(f"layer {layer}: {bits}-bit weights are not supported by the kernels; "
                            f"supported: {SUPPORTED}")
    if group and group not in GROUP_SIZES:
        raise LoweringError(f"layer {layer}: group size {group} is not supported by the kernels; "
                            f"supported: {', '.join(map(str, GROUP_SIZES))} or one scale per output channel")
    if values is not None and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < -(1 << (bits - 1)) or hi > (1 << (bits - 1)) - 1:
            raise LoweringError(f"layer {layer}: weights are declared {bits}-bit but hold values in "
                                f"[{lo}, {hi}], outside [{-(1 << (bits - 1))}, {(1 << (bits - 1)) - 1}]")


def check_act_bits(layer: str, bits) -> None:
    """Activations are int8 tensors holding 2..8-bit values (a 4-bit range in int8 storage)."""
    if bits is not None and not (isinstance(bits, numbers.Integral) and 2 <= bits <= 8):
        raise LoweringError(f"layer {layer}: {bits}-bit activations are not supported by the kernels; "
                            "supported: 2 to 8 bits (stored as int8)")
