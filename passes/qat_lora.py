"""Low-rank adapters trained through the quantizer (EfficientDM's QALoRA, He et al. 2024).

Each quantized weight W ([N, K...], K... flattened to K) gets A [r, K] (uniform Kaiming init)
and B [N, r] (zeros), and the training view quantizes

    W' = W + (alpha / r) * B @ A          (fake_quant(W') in place of fake_quant(W))

with W frozen: the adapters (and the quantizers' scales) learn through the straight-through
estimator. `merge` folds them into W before the final quantization, so `convert` quantizes
W' with the learned scale and the deployed integer weights are exactly what was trained.
"""

from __future__ import annotations

import math

import torch

from .qat_params import owner_of


def make_adapters(qp, rank: int, alpha: float, seed: int = 0) -> dict[str, tuple]:
    """node name -> (A, B, scale) for every weight quantizer of a weight attribute."""
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for q in qp.weight_quantizers:
        w = getattr(*owner_of(qp.gm, q["w"]))
        n, k = w.shape[0], w[0].numel()
        r = min(rank, n, k)
        bound = 1.0 / math.sqrt(k)
        a = torch.nn.Parameter((torch.rand(r, k, generator=gen) * 2 - 1) * bound)
        b = torch.nn.Parameter(torch.zeros(n, r))
        adapters[q["node"]] = (a, b, (alpha or r) / r)
    return adapters


@torch.no_grad()
def merge(qp, adapters: dict[str, tuple]) -> None:
    """W <- W + scale * B @ A for every adapter."""
    by_node = {q["node"]: q for q in qp.weight_quantizers}
    for name, (a, b, scale) in adapters.items():
        w = getattr(*owner_of(qp.gm, by_node[name]["w"]))
        w.add_((b @ a).reshape(w.shape) * scale)


def tensors(adapters: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b, _) in adapters.items():
        out[f"{name}@lora_A"], out[f"{name}@lora_B"] = a.detach(), b.detach()
    return out


@torch.no_grad()
def load(adapters: dict[str, tuple], stored: dict[str, torch.Tensor]) -> None:
    for name, (a, b, _) in adapters.items():
        a.copy_(stored[f"{name}@lora_A"])
        b.copy_(stored[f"{name}@lora_B"])
