"""Where the W4A4 error comes from: one quantized model, its quantizers switched off by group.

    python benchmarks/accuracy_ablation.py --model minilm --recipe rotate+tclip --calib 64
    python benchmarks/accuracy_ablation.py --model smollm2 --recipe rotate+tclip+gptq-seq --kv-clip 0.95

Runs one recipe of `benchmarks/accuracy.py` (same loaders, calibration data, fake-quant text and
metric: MiniLM mean cosine to float on the scored sentences without WordSim, SmolLM2 quick
perplexity on 4 windows) once, then scores copies of the quantized IR in which only one group
of quantizers stays on (the others replaced by their input, or by the float weight GPTQ rounded,
so the copy computes float there): weights, all activations, the KV cache, or the per-token
quantizer of one layer type's input (q/k/v, attention output, FFN up, FFN down). "all but X"
rows turn off only group X.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import qcompiler as qc  # noqa: E402
from qcompiler.ir import copy_ir, op_name  # noqa: E402
from qcompiler.passes.qat_graph import without_quantizers  # noqa: E402

from benchmarks import accuracy as acc  # noqa: E402
from benchmarks import realdata as rd  # noqa: E402
from qcompiler.passes.rotate import module_path  # noqa: E402

# layer type of a linear from its module path (MiniLM's BERT names, SmolLM2's Llama names)
TYPES = (("qkv", ("attention.self.query", "attention.self.key", "attention.self.value", "q_proj", "k_proj", "v_proj")),
         ("attn-out", ("attention.output.dense", "o_proj")),
         ("ffn-up", ("intermediate.dense", "gate_proj", "up_proj")),
         ("ffn-down", ("output.dense", "down_proj")))


def layer_type(lin) -> str:
    path = module_path(lin)
    for name, keys in TYPES:
        if any(path.endswith(k) for k in keys):
            return name
    return "other"


def quantizer_groups(gm) -> dict[str, list]:
    """Every fake-quant node of the IR by group: weights, act:<layer type>, kv-key, kv-value."""
    groups: dict[str, list] = {}
    for n in gm.graph.nodes:
        if op_name(n) != "qc.fake_quant":
            continue
        m = n.meta.get("qc", {})
        if m.get("role") == "weight":
            g = "weights"
        elif str(m.get("granularity", "")).startswith("kv-"):
            g = "kv-key" if "key" in m["granularity"] else "kv-value"
        else:
            lins = [u for u in n.users if op_name(u) == "aten.linear"]
            g = "act:" + (layer_type(lins[0]) if lins else "other")
        groups.setdefault(g, []).append(n.name)
    return groups


def setups(groups: dict) -> list[tuple[str, set]]:
    every = {x for v in groups.values() for x in v}
    acts = {x for g, v in groups.items() if g.startswith("act:") for x in v}
    rows = [("all", every), ("weights only", set(groups.get("weights", []))), ("activations only", acts)]
    rows += [(f"{g} only", set(v)) for g, v in groups.items() if g != "weights"]
    rows += [(f"all but {g}", every - set(v)) for g, v in groups.items()]
    return rows


def minilm_setup(args):
    bert, tok = rd.load_minilm()
    enc = rd.MiniLMEncoder(bert).eval()
    sents = rd.wiki_sentences(args.n)
    b = tok(sents, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    rows = args.calib or 64
    calib = acc.packed_calibration(tok, rd.wiki_sentences(args.n + 600 * -(-rows // 64))[args.n:], rows, 128)

    def embed(fn):
        with torch.no_grad():
            return torch.cat([fn(b.input_ids[i: i + 50], b.attention_mask[i: i + 50]) for i in range(0, args.n, 50)])

    ref = embed(enc)

    def score(fn):
        e = embed(fn)
        return float(((e * ref).sum(-1) / (e.norm(dim=-1) * ref.norm(dim=-1))).mean())
    ir0 = qc.trace(enc, (b.input_ids[:2], b.attention_mask[:2]))
    return ir0, acc.BERT_RECIPES, calib, score, "", "W4A4"


def smollm2_setup(args):
    model, tok = rd.load_smollm2()
    windows = rd.wiki_windows(tok, n=300, length=512)
    evalw, calib = windows[:4], [w[None] for w in windows[200: 200 + (args.calib or 4)]]
    state: dict = {}
    ir0 = acc.smollm2_tracer(model, rd.LogitsOnly(model), evalw, state)()
    return ir0, acc.LLM_RECIPES, calib, lambda fn: acc.perplexity(fn, evalw), state["lm_head"], "W4A4KV4"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    p.add_argument("--recipe", default="rotate+tclip+gptq-seq", help="a recipe of benchmarks/accuracy.py; "
                   "'+rtn' variants drop GPTQ: e.g. rotate+tclip")
    p.add_argument("--pre", default="", help="extra passes before fake-quant (a pipeline text)")
    p.add_argument("--rotate-opts", default="", help="options appended to the recipe's rotate(...), e.g. online_signs=true")
    p.add_argument("--post", default="", help="extra passes after fake-quant, before the recipe's own")
    p.add_argument("--calib", type=int, default=0)
    p.add_argument("--a-clip", type=float, default=1.0)
    p.add_argument("--kv-clip", type=float, default=1.0)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--a-symmetric", default="true", choices=("true", "false"))
    p.add_argument("--kv-asym", action="store_true", help="asymmetric KV cache (kv_symmetric=false)")
    p.add_argument("--n", type=int, default=500, help="MiniLM sentences scored")
    p.add_argument("--only", default="", help="comma list of setup names to score (default all)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ir0, recipes, calib, score, skip, bits = (minilm_setup if args.model == "minilm" else smollm2_setup)(args)
    name = args.recipe
    if name in recipes:
        pre, post = recipes[name]
    elif name == "rotate+tclip":
        pre, post = recipes["rotate+tclip+gptq"][0], [acc.TOKEN_CLIP]
    elif name == "rotate":
        pre, post = recipes["rotate+gptq"][0], []
    else:
        raise SystemExit(f"unknown recipe {name!r}")
    if args.rotate_opts:
        pre = [t[:-1] + f",{args.rotate_opts})" if t.startswith("rotate(") else t for t in pre]
    pre = pre + ([args.pre] if args.pre else [])
    post = ([args.post] if args.post else []) + post
    t = time.time()
    ir = copy_ir(ir0)
    text = ",".join(pre + [acc.fq_text(bits, skip, "linear", args.a_clip, args.kv_clip, args.group, kv_asym=args.kv_asym)] + post)
    if args.a_symmetric == "false":
        text = text.replace("a_symmetric=true", "a_symmetric=false")
    print(text, flush=True)
    qc.PassManager.parse(text).run(ir, qc.PassContext(calib=calib, verify=False))
    print(f"pipeline: {time.time() - t:.0f} s", flush=True)
    groups = quantizer_groups(ir)
    print({g: len(v) for g, v in groups.items()}, flush=True)
    only = set(args.only.split(",")) if args.only else None
    print(f"\n| {args.model} {name} ({text}) | {'cosine' if args.model == 'minilm' else 'ppl'} | s |\n|---|---|---|")
    for label, names in setups(groups):
        if only and label not in only:
            continue
        t = time.time()
        v = score(without_quantizers(ir, frozenset(names)))
        print(f"| {label} | {v:.4f} | {time.time() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
