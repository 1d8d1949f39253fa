"""QAT's trainable tensors: weights, and the learned step sizes and offsets of the quantizers.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) learns each quantizer's scale
s by gradient descent; `qc.fake_quant` gives d y / d s (round(x/s) - x/s inside the grid,
qmin - z or qmax - z outside it) when the scale requires grad. LSQ scales that gradient by

    g = 1 / sqrt(N * qmax)

with N the number of values one scale element quantizes (weights: elements per channel or
group; activations: elements per example), which a gradient hook applies here. LSQ+ (Bhalgat
et al. 2020) also learns the offset of asymmetric activation quantizers: the IR's zero point
z must stay an integer (the integer kernels take it as one), so a float latent z' is trained
with the straight-through gradient of z and z = clamp(round(z'), qmin, qmax) after each step.

During training every trained tensor is an `nn.Parameter` of the IR (scales and zero points
are buffers otherwise); `restore()` puts them back as they were, keeping the learned values,
so `convert` reads the learned scales from the same attributes.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from qcompiler.ir import get_attr_tensor, op_name


def fake_quants(gm: torch.fx.GraphModule, role: str | None = None) -> list[torch.fx.Node]:
    """The `qc.fake_quant` nodes of the IR (of one role, "weight" or "act", if given)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == "qc.fake_quant"
            and (role is None or n.meta.get("qc", {}).get("role") == role)]


def owner_of(gm, target: str):
    path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    return owner, leaf


def _per_example(node: torch.fx.Node) -> int:
    """Elements per example of an activation (dims after the batch), 1 when unknown."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not all(isinstance(d, int) for d in val.shape[1:]):
        return 1
    return max(1, math.prod(val.shape[1:]))


class QuantParams:
    """Makes the IR's weights, scales and offsets trainable, and undoes it afterwards.

    learn: "lsq" (scales), "lsq+" (scales and activation offsets) or "fixed" (neither).
    train_weights: train weights, biases and float parameters (norms); False freezes them
        (low-rank adapters then carry the weight updates).
    learn_acts: learn activation quantizers too (False keeps their calibrated ranges: noise
        inputs say nothing about the real activations' ranges).
    """

    def __init__(self, gm: torch.fx.GraphModule, learn: str = "lsq+", train_weights: bool = True,
                 learn_acts: bool = True):
        self.gm = gm
        self._saved: dict[str, tuple[bool, bool]] = {}  # target -> (was a buffer, requires_grad)
        self._copies: dict[int, torch.nn.Parameter] = {}
        self._hooks = []
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.scales: dict[str, torch.nn.Parameter] = {}
        self.zero_points: dict[str, tuple[torch.nn.Parameter, torch.Tensor, int, int]] = {}
        self.weight_quantizers: list[dict] = []  # per weight fake-quant: w, s targets, grid, group
        wq, aq = fake_quants(gm, "weight"), fake_quants(gm, "act")
        quant_targets = {a.target for n in wq + aq for a in n.args[1:3]}
        for n in wq:
            w, s, _, qmin, qmax, group = n.args
            if w.op == "get_attr":
                self.weight_quantizers.append({"node": n.name, "w": w.target, "s": s.target, "qmin": qmin,
                                               "qmax": qmax, "group": group, "bits": n.meta["qc"].get("bits")})
        if train_weights:
            for name in self._weight_targets(gm, wq, quant_targets):
                self.weights[name] = self._make_param(name)
        if learn in ("lsq", "lsq+"):
            for n in wq + (aq if learn_acts else []):
                x, s, z, qmin, qmax, group = n.args
                if s.op != "get_attr" or s.target in self.scales:
                    continue
                p = self._make_param(s.target)
                self.scales[s.target] = p
                per = self._values_per_scale(gm, n, p)
                self._hooks.append(p.register_hook(_scaler(1.0 / math.sqrt(per * max(qmax, 1)))))
                asym = n.meta["qc"].get("role") == "act" and not n.meta["qc"].get("symmetric", False)
                if learn == "lsq+" and asym and z.op == "get_attr" and z.target not in self.zero_points:
                    zp = self._make_param(z.target)
                    self._hooks.append(zp.register_hook(_scaler(1.0 / math.sqrt(per * max(qmax, 1)))))
                    self.zero_points[z.target] = (zp, zp.detach().clone(), qmin, qmax)
        self._frozen = {name: p.requires_grad for name, p in gm.named_parameters() if name not in self._saved}
        for name in self._frozen:  # everything else stays fixed (no gradients computed for it)
            getattr(*owner_of(gm, name)).requires_grad_(False)

    # -- set-up
    @staticmethod
    def _weight_targets(gm, wq, quant_targets) -> list[str]:
        """Weights read by weight quantizers, biases of quantized ops, and the IR's float
        parameters (e.g. norm weights); constant buffers that are none of these stay frozen."""
        names = [n.args[0].target for n in wq if n.args[0].op == "get_attr"]
        for n in gm.graph.nodes:
            if n.meta.get("qc", {}).get("quantized") and len(n.args) > 2 and isinstance(n.args[2], torch.fx.Node) \
                    and n.args[2].op == "get_attr":
                names.append(n.args[2].target)
        params = {name for name, p in gm.named_parameters() if p.is_floating_point()}
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        names += sorted((params & used) - quant_targets)
        out = []
        for name in names:
            if name not in out and name not in quant_targets and getattr(*owner_of(gm, name)).is_floating_point():
                out.append(name)
        return out

    @staticmethod
    def _values_per_scale(gm, node, scale) -> int:
        if node.meta["qc"].get("role") == "weight":
            return max(1, get_attr_tensor(gm, node.args[0]).numel() // max(1, scale.numel()))
        return _per_example(node.args[0])

    def _make_param(self, target: str) -> torch.nn.Parameter:
        """Replace the IR's tensor by a trainable copy: the IR may share its weights with the
        traced model (torch.export does), which training must leave untouched."""
        owner, leaf = owner_of(self.gm, target)
        t = getattr(owner, leaf)
        was_buffer = leaf in owner._buffers
        self._saved[target] = (was_buffer, t.requires_grad)
        if id(t) not in self._copies:  # tensors tied under two names stay tied
            self._copies[id(t)] = torch.nn.Parameter(t.detach().clone(), requires_grad=True)
        p = self._copies[id(t)]
        (owner._buffers if was_buffer else owner._parameters).pop(leaf)
        owner.register_parameter(leaf, p)
        return p

    # -- training
    def groups(self, lr: float, lr_quant: float) -> list[dict]:
        """Optimizer parameter groups: weights at `lr`; scales and offset latents at `lr_quant`."""
        latents = [lat for _, lat, _, _ in self.zero_points.values()]
        for lat in latents:
            lat.requires_grad_(True)
        groups = [{"params": [p for p in self.weights.values() if p.requires_grad], "lr": lr, "name": "weights"},
                  {"params": list(self.scales.values()), "lr": lr_quant, "name": "scales"},
                  {"params": latents, "lr": lr_quant, "name": "zero_points"}]
        return [g for g in groups if g["params"]]

    def before_step(self) -> None:
        """Straight-through: the integer zero point's gradient trains its float latent."""
        for zp, lat, _, _ in self.zero_points.values():
            lat.grad = None if zp.grad is None else zp.grad.clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep scales positive and zero points integer and on the grid."""
        for s in self.scales.values():
            s.clamp_(min=1e-8)
        for zp, lat, qmin, qmax in self.zero_points.values():
            lat.clamp_(qmin, qmax)
            zp.copy_(torch.round(lat))

    def state(self) -> dict[str, torch.Tensor]:
        """Every trained value by name (latents under `<zp>@latent`), for checkpoints."""
        out = {name: getattr(*owner_of(self.gm, name)).detach() for name in self._saved}
        out.update({f"{name}@latent": lat.detach() for name, (_, lat, _, _) in self.zero_points.items()})
        return out

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self._saved:
            getattr(*owner_of(self.gm, name)).copy_(tensors[name])
        for name, (_, lat, _, _) in self.zero_points.items():
            lat.copy_(tensors[f"{name}@latent"])

    # -- tear-down
    def restore(self) -> None:
        """Parameters back to buffers where they were buffers; learned values kept."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for target, (was_buffer, requires_grad) in self._saved.items():
            owner, leaf = owner_of(self.gm, target)
            t = getattr(owner, leaf)
            del owner._parameters[leaf]
            if was_buffer:
                owner.register_buffer(leaf, t.detach())
            else:
                owner.register_parameter(leaf, torch.nn.Parameter(t.detach(), requires_grad=requires_grad))
        self._saved, self._copies = {}, {}
        for name, requires_grad in self._frozen.items():
            getattr(*owner_of(self.gm, name)).requires_grad_(requires_grad)
        self._frozen = {}


def _scaler(factor: float):
    return lambda g: g * factor
