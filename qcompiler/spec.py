"""Quantization recipes: `QuantSpec` and the short strings users write ("w8a8", "w4a8g64",
and weight-only "w4", "w4g128", "w2g64": integer weights, float activations).

A recipe is sugar for a pipeline: `QuantSpec.pipeline()` gives the pass-pipeline text that
`qcompiler.compile` runs, so everything a recipe does is reachable as explicit passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import QuantSpecError

MIN_BITS, MAX_BITS = 2, 8
OBSERVERS = ("minmax", "percentile", "mse", "kl")
_RECIPE = re.compile(r"^w(\d+)(?:a(\d+))?(?:g(\d+))?$")


def check_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantSpecError(
            f"{what}={bits!r} is not supported: bit widths go from {MIN_BITS} to {MAX_BITS} "
            "(e.g. w=8 or w=4 for weights, a=8 for activations)"
        )
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    w_bits/a_bits: weight and activation widths (2..8); a_bits=None quantizes only the
    weights of linear layers (weight-only: float activations, `qc.linear_weight_only`; other
    layers stay float). group_size: 0 for one scale per output channel, else one scale per
    group of that many input elements (linear layers; convolutions stay per channel; the
    kernels take 32, 64 and 128). a_symmetric: activations symmetric around 0 (else
    asymmetric with a zero point). observer: how `calibrate` sets activation ranges.
    """

    w_bits: int = 8
    a_bits: int | None = 8
    group_size: int = 0
    a_symmetric: bool = False
    observer: str = "minmax"

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.group_size < 0:
            raise QuantSpecError(f"group_size={self.group_size} must be 0 (per channel) or positive")
        if self.observer not in OBSERVERS:
            raise QuantSpecError(f"observer={self.observer!r} is not one of {', '.join(OBSERVERS)}")

    @classmethod
    def parse(cls, recipe: "str | QuantSpec") -> "QuantSpec":
        """'w8a8' (per channel), 'w4a8' (group 128), 'w4a8g64', 'w4a8g0' (per channel); without
        a<bits> weight-only: 'w4' (group 128, as 'w4g128'), 'w2g64', 'w4g0' (per channel).
        Without g<group>, weights of 2-4 bits (packed) get groups of 128 and weights of 5-8 bits
        (held in int8) one scale per channel, on which the int8 kernels run: 'w7a8' is the
        7-bit per-channel recipe whose products fit x86's 3-instruction u8 x s8 dot."""
        if isinstance(recipe, QuantSpec):
            return recipe
        m = _RECIPE.match(str(recipe).strip().lower())
        if not m:
            raise QuantSpecError(
                f"unknown quantization recipe {recipe!r}: write w<bits>[a<bits>][g<group>], e.g. "
                "'w8a8', 'w7a8' (per channel), 'w4a8' (group 128), 'w4a8g64', weight-only 'w4g128' / 'w2g64', "
                "or pass a qcompiler.QuantSpec"
            )
        w, a = int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)
        g = int(m.group(3)) if m.group(3) is not None else (128 if w <= 4 else 0)
        return cls(w_bits=w, a_bits=a, group_size=g)

    def pipeline(self) -> str:
        gran = "group" if self.group_size else "channel"
        a = "" if self.a_bits is None else f",a={self.a_bits}"
        fq = f"fake-quant(w={self.w_bits}{a},granularity={gran}"
        fq += f",group={self.group_size}" if self.group_size else ""
        if self.a_bits is None:  # weights only: nothing to calibrate
            return f"fold-batchnorm,{fq},ops=linear,weight_only=true),convert"
        fq += ",a_symmetric=true" if self.a_symmetric else ""
        return f"fold-batchnorm,{fq}),calibrate(observer={self.observer}),convert"
