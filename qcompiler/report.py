"""The compile report: per quantized layer its op, widths, granularity and SQNR against the
float model, plus the ops left in float and the pipeline that ran.

SQNR (dB) of a layer = 10 log10(sum f^2 / sum (f - q)^2), where f is the float model's
output of that layer and q the converted IR's (dequantized) output of the same layer, both
on the same input batch. Layers whose integer output feeds the next layer directly are
compared after dequantizing with their output scale (and after the fused ReLU, if any).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

from .ir import op_name
from .ops import dequantize

_LAYOUT_OPS = {"aten.view", "aten.reshape", "aten.flatten", "aten.permute", "aten.transpose",
               "aten.unsqueeze", "aten.squeeze", "aten.contiguous", "aten.expand", "aten.t",
               "aten.clone", "aten.alias", "aten._assert_tensor_metadata", "aten.size", "aten.sym_size"}


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class Report:
    target: str
    pipeline: str
    layers: list[dict] = field(default_factory=list)
    float_ops: dict[str, int] = field(default_factory=dict)
    output_sqnr_db: list[float] = field(default_factory=list)
    timings: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # microcontroller targets: flash / SRAM measured at build
    mixed_precision: dict = field(default_factory=dict)  # hawq's choice: budget, bits per layer, size, frontier
    token_bits: dict = field(default_factory=dict)  # `token-bits`: widths, keep, measured average width

    @property
    def flash_bytes(self) -> int | None:
        """Flash (text + rodata + data) of the linked firmware, for targets that measure it."""
        return self.memory.get("flash_bytes")

    @property
    def peak_sram_bytes(self) -> int | None:
        """Peak SRAM (static data, arena, stack) of the firmware, for targets that measure it."""
        return self.memory.get("peak_sram_bytes")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict) -> "Report":
        return cls(**d)

    def __str__(self) -> str:
        rows = [("layer", "op", "w bits", "a bits", "granularity", "SQNR dB")]
        for l in self.layers:
            gran = l["granularity"] + (f" {l['group_size']}" if l.get("group_size") else "")
            rows.append((l["name"], l["op"], str(l.get("w_bits", "-")), str(l["a_bits"]), gran, _fmt(l["sqnr_db"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"target: {self.target}   pipeline: {self.pipeline}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        outs = ", ".join(_fmt(v) for v in self.output_sqnr_db)
        lines.append(f"model output SQNR vs float: {outs} dB")
        floats = ", ".join(f"{k} x{v}" for k, v in sorted(self.float_ops.items())) or "none"
        lines.append(f"not quantized (float) ops: {floats}")
        if self.mixed_precision:
            h = self.mixed_precision
            b = h["budget"]
            lines.append(f"hawq: {b['kind']} {h['cost']:.6g} of {b['value']:g} {b['unit']} (smallest {b['smallest']:.6g}); "
                         f"weights {h['size_kb']:.2f} KiB; bits " + ", ".join(f"{k}={v}" for k, v in h["bits"].items())
                         + f"; Pareto frontier of {len(h['frontier'])} points")
        if self.token_bits:
            t = self.token_bits
            lines.append(f"per-token activation bits: {t['high']} for the {t['keep']:g} most attended tokens, "
                         f"{t['low']} for the rest; average {t['avg_bits']:.3f} bits on the calibration data")
        if self.memory:
            m = self.memory
            lines.append(f"flash {m['flash_bytes']} B of {m['flash_limit']}; peak SRAM {m['peak_sram_bytes']} B of "
                         f"{m['sram_limit']} (arena {m['arena_bytes']} B, unplanned {m['unplanned_bytes']} B, "
                         f"stack {m['stack_bytes']} B)")
            if sum(list(m.get("flash_regions", {}).values())[1:]):  # weights placed past the primary flash
                lines.append("flash by region: " + ", ".join(f"{k} {v} B" for k, v in m["flash_regions"].items()))
            if "patches" in m:
                p = m["patches"]
                lines.append(f"patch-based: {p['split']}; arena {p['arena_bytes_unsplit']} B unsplit -> {p['arena_bytes']} B")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.1f}"


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


def _layer_value(n: torch.fx.Node, value: torch.Tensor) -> torch.Tensor:
    qc = n.meta["qc"]
    if "out_scale" in qc:
        return dequantize(value, torch.tensor(qc["out_scale"]), torch.tensor(float(qc["out_zp"])))
    return value


def _is_float_compute(n: torch.fx.Node) -> bool:
    """An ATen op computing on floats (layout ops aside): what stayed unquantized."""
    if n.op != "call_function" or not op_name(n).startswith("aten."):
        return False
    if ".".join(op_name(n).split(".")[:2]) in _LAYOUT_OPS:
        return False
    val = n.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.dtype.is_floating_point


def build_report(float_ir, ir, batch: tuple, target: str, pipeline: str, timings=(), memory=None) -> Report:
    """Measure per-layer and output SQNR of `ir` against `float_ir` on one batch."""
    compared = [n for n in ir.graph.nodes if n.meta.get("qc", {}).get("compare")]
    want = {n.meta["qc"]["compare"] for n in compared}
    ref = _Capture(float_ir, want)
    test = _Capture(ir, {n.name for n in compared})
    with torch.no_grad():
        f_out = ref.run(*batch)
        q_out = test.run(*batch)
    layers = []
    for n in compared:
        qc = n.meta["qc"]
        acc = next((a for a in ir.graph.nodes if a.meta.get("qc", {}).get("source") == qc["source"]
                    and "kind" in a.meta.get("qc", {})), None)
        info = acc.meta["qc"] if acc is not None else {}
        f = ref.seen.get(qc["compare"])
        sqnr = sqnr_db(f, _layer_value(n, test.seen[n.name])) if f is not None else float("nan")
        layers.append({
            "name": qc["source"], "op": info.get("kind", "?"), "w_bits": info.get("w_bits", "-"),
            "a_bits": f"{info['a_bits']}/{info['a_bits_low']}" if "a_bits_low" in info else info.get("a_bits", "-"),
            "granularity": info.get("granularity", "tensor"),
            "group_size": info.get("group_size", 0), "sqnr_db": sqnr,
        })
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for x in o for t in flat(x)]  # noqa: E731
    outs = [sqnr_db(a, b) for a, b in zip(flat(f_out), flat(q_out))]
    float_ops = Counter(op_name(n) for n in ir.graph.nodes if _is_float_compute(n))
    hawq = ir.meta.get("qc", {}).get("hawq")
    mixed = {k: hawq[k] for k in ("budget", "bits", "cost", "size_kb", "frontier")} if hawq else {}
    return Report(target, pipeline, layers, dict(float_ops), outs, [list(t) for t in timings], dict(memory or {}), mixed,
                  dict(ir.meta.get("qc", {}).get("token_bits", {})))
