"""Weight oscillation in low-bit QAT: tracking, damping, freezing.

With a straight-through estimator a latent weight near a rounding threshold keeps crossing
it, so its integer value flips between two grid points from step to step; at 2-4 bits this
biases batch statistics and slows convergence ("Overcoming Oscillations in Quantization-Aware
Training", Nagel et al. 2022; "Oscillation-free Quantization for Low-bit Vision
Transformers", Liu et al. 2023). For every weight quantizer of at most `bits` bits:

- tracking: w_int = clamp(round(w / s)) after each step; an oscillation is a change of w_int
  whose direction is opposite to that weight's previous change; the frequency is an EMA
  f <- m f + (1 - m) [oscillated];
- damping: the regularizer  lambda * mean((c - round(c))^2),  c = clamp(w / s, qmin, qmax)
  with round(c) and s held constant, pulls latent weights towards their grid point;
- freezing: a weight whose frequency exceeds the threshold is fixed at the integer its EMA
  w_ema <- m w_ema + (1 - m) w_int rounds to (the value it oscillates around most), its
  gradient masked; with a learned scale it is kept at  s * frozen_int  after every step.

`qat` tracks only when damping or freezing is on (`track`): the state is four weight-sized
tensors and the update several passes over every weight per step.
"""

from __future__ import annotations

import torch

from qcompiler.ops import _expand_groups

from .qat_params import owner_of


class Oscillation:
    def __init__(self, qp, bits: int = 4, damp: float = 0.0, freeze: float = 0.0, momentum: float = 0.99,
                 track: bool = True):
        self.qp, self.damp, self.freeze_at, self.m = qp, damp, freeze, momentum
        self.tracked = [q for q in qp.weight_quantizers if q["bits"] is not None and q["bits"] <= bits
                        and q["w"] in qp.weights] if track else []
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks = []
        for q in self.tracked:
            w_int = self._int(q)
            self.state[q["w"]] = {"int": w_int, "dir": torch.zeros_like(w_int), "freq": torch.zeros_like(w_int),
                                  "ema": w_int.clone(), "frozen": torch.zeros_like(w_int, dtype=torch.bool)}
            if freeze > 0:
                mask = self.state[q["w"]]["frozen"]
                self._hooks.append(qp.weights[q["w"]].register_hook(lambda g, mask=mask: g.masked_fill(mask, 0.0)))

    def _scale(self, q) -> torch.Tensor:
        w = self.qp.weights[q["w"]]
        s = getattr(*owner_of(self.qp.gm, q["s"]))
        return _expand_groups(s.detach(), w, q["group"])

    def _int(self, q) -> torch.Tensor:
        w = self.qp.weights[q["w"]].detach()
        return torch.clamp(torch.round(w / self._scale(q)), q["qmin"], q["qmax"])

    def loss(self) -> torch.Tensor | None:
        """The damping regularizer (None when damping is off)."""
        if self.damp <= 0 or not self.tracked:
            return None
        terms = []
        for q in self.tracked:
            c = torch.clamp(self.qp.weights[q["w"]] / self._scale(q), q["qmin"], q["qmax"])
            terms.append((c - torch.round(c).detach()).pow(2).mean())
        return self.damp * torch.stack(terms).mean()

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: count oscillations, freeze, keep frozen weights fixed."""
        for q in self.tracked:
            st, w = self.state[q["w"]], self.qp.weights[q["w"]]
            new = self._int(q)
            delta = torch.sign(new - st["int"])
            flipped = (delta != 0) & (delta == -st["dir"])
            st["freq"].mul_(self.m).add_(flipped.float(), alpha=1 - self.m)
            st["dir"] = torch.where(delta != 0, delta, st["dir"])
            st["int"] = new
            st["ema"].mul_(self.m).add_(new, alpha=1 - self.m)
            if self.freeze_at > 0:
                st["frozen"] |= st["freq"] > self.freeze_at
                fixed = torch.round(st["ema"]) * self._scale(q)
                w.copy_(torch.where(st["frozen"], fixed, w))

    def stats(self) -> dict:
        total = sum(st["int"].numel() for st in self.state.values())
        if not total:
            return {"tracked": 0}
        osc = sum(int((st["freq"] > 0.005).sum()) for st in self.state.values())
        frozen = sum(int(st["frozen"].sum()) for st in self.state.values())
        return {"tracked": total, "oscillating": osc / total, "frozen": frozen / total}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{w}@osc.{k}": (v.to(torch.uint8) if v.dtype == torch.bool else v)
                for w, st in self.state.items() for k, v in st.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for w, st in self.state.items():
            for k in st:
                v = tensors[f"{w}@osc.{k}"]
                if k == "frozen":
                    st[k].copy_(v.bool())  # in place: the gradient mask hook holds this tensor
                else:
                    st[k] = v.clone()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
