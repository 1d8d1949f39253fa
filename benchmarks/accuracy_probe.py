"""Why a rotation can raise 4-bit round-to-nearest error: a per-layer probe on SmolLM2.

    python benchmarks/accuracy_probe.py [--blocks 0,3,12,24] [--tokens 256]

For the linears reading each block's two RMSNorms (q_proj after input_layernorm, gate_proj
after post_attention_layernorm) it prints the relative output error ||X dW^T||^2 / ||X W^T||^2
of W4 group-128 symmetric round-to-nearest, without and with the residual Hadamard rotation
of `rotate` (gamma folded into W, X = normalized stream times Q), next to the largest
normalized activation, its channel and that channel's norm weight. SmolLM2 has a
"massive activation" channel (507) holding a whole token's energy, with a post-attention
norm weight of ~0: unrotated, gamma ~ 0 hides it from gate/up; rotated, its energy lands on
every input channel and meets the weight noise of all of them (RTN's noise is isotropic),
so the error grows; GPTQ, which weights rounding by the Hessian X^T X, is the remedy.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import realdata as rd  # noqa: E402
from qcompiler.passes import klt  # noqa: E402
from qcompiler.passes.fake_quant import weight_scale  # noqa: E402


def rtn(w: torch.Tensor, bits: int = 4, group: int = 128) -> torch.Tensor:
    s = weight_scale(w, bits, group).double().repeat_interleave(group, 1)[:, : w.shape[1]]
    q = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / s), -q, q) * s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,3,6,12,18,24,29")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)
    model, tok = rd.load_smollm2()
    ids = rd.wiki_windows(tok, n=201, length=512)[200:, : args.tokens]  # disjoint from eval windows
    inputs = {}
    blocks = [int(b) for b in args.blocks.split(",")]
    for i in blocks:
        layer = model.model.layers[i]
        for which, norm in (("in", layer.input_layernorm), ("post", layer.post_attention_layernorm)):
            norm.register_forward_pre_hook(lambda m, a, key=(i, which): inputs.__setitem__(key, a[0].detach().double()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    q = klt.rotation("hadamard", model.config.hidden_size, 0)
    print("| block | linear | RTN W4 error unrotated | rotated | max normalized x | channel | its norm weight |")
    print("|---|---|---|---|---|---|---|")
    for i in blocks:
        layer = model.model.layers[i]
        for which, norm, lin in (("in", layer.input_layernorm, layer.self_attn.q_proj),
                                 ("post", layer.post_attention_layernorm, layer.mlp.gate_proj)):
            h = inputs[(i, which)].reshape(-1, model.config.hidden_size)
            xn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            g, w = norm.weight.detach().double(), lin.weight.detach().double()
            y = (xn * g) @ w.T
            plain = float(((xn * g) @ (w - rtn(w)).T).pow(2).sum() / y.pow(2).sum())
            wr = (w * g) @ q
            rotated = float(((xn @ q) @ (wr - rtn(wr)).T).pow(2).sum() / y.pow(2).sum())
            top = int(xn.abs().amax(0).argmax())
            print(f"| {i} | {'q_proj' if which == 'in' else 'gate_proj'} | {plain:.4f} | "
                  f"{rotated:.4f} | {float(xn.abs().max()):.1f} | {top} | {float(g[top]):.4f} |")


if __name__ == "__main__":
    main()
