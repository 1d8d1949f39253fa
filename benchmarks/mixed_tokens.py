"""Per-token activation bits (`token-bits`, EdgeQAT) on SmolLM2-135M vs uniform per-token widths.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixed_tokens.py --windows 4 --block-latency
    (or: benchmarks/mixed.py --smollm2 ..., which calls main_tokens with these options)

Perplexity protocol of `benchmarks/accuracy.py`: SmolLM2-135M-Instruct, the first n windows of
512 tokens of gensim's Wikipedia test text; calibration windows 200.. (disjoint). The 210
block linears are quantized (lm_head stays float), weights symmetric per channel at --w bits,
activations symmetric per token with run-time scales:

    A4 / A8      fake-quant(a=4 | a=8, a_granularity=token)       every token at 4 / 8 bits
    token-bits   fake-quant(a=8, ...),token-bits(high, low, keep)  the keep fraction of tokens
                 receiving the most attention at `high` bits, the rest at `low` bits (the
                 first block's q/k/v, before any attention, keep `a`'s 8 bits)

Perplexity is that of the fake-quant IR run in torch (`convert` gives the same function up
to float rounding: integer dot products, scales multiplied in another order). The average
width is what the pass measured on the calibration windows (elements of every quantized
linear input, each tensor once). `gap recovered` = (ppl_A4 - ppl) / (ppl_A4 - ppl_A8), also
on log perplexity. Control row: the same pipeline with every mask replaced by a fixed random
choice of as many tokens (same average width), to show what the attention ranking adds.

Latency (--block-latency): one decoder block with SmolLM2-135M's sizes (d 576, 9 heads, 3 KV
heads, MLP 1536) at T = --tokens, compiled for the host through convert (integer linears
with run-time per-token scales) for each recipe, median of --repeats runs, one thread.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import qcompiler as qc  # noqa: E402
from qcompiler.ir import copy_ir, op_name  # noqa: E402


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-token bits (SmolLM2-135M)")
    g.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens")
    g.add_argument("--calib-windows", type=int, default=4, help="calibration windows (token-bits' average width)")
    g.add_argument("--high", type=int, default=8)
    g.add_argument("--low", type=int, default=4)
    g.add_argument("--keep", type=float, default=0.2, help="fraction of tokens at the high width")
    g.add_argument("--w", type=int, default=8, help="weight bits (per channel)")
    g.add_argument("--kv", type=int, default=0, help="KV-cache bits (0: float cache)")
    g.add_argument("--block-latency", action="store_true", help="also time one SmolLM2-sized block on the host")
    g.add_argument("--tokens", type=int, default=128, help="sequence length of the latency block")
    g.add_argument("--repeats", type=int, default=20)
    g.add_argument("--no-ppl", action="store_true", help="skip the SmolLM2 perplexities (latency only)")
    g.add_argument("--fresh", action="store_true", help="recompute cached perplexities")
    g.add_argument("--rotate", action="store_true", help="QuaRot's Hadamard rotations first (benchmarks/accuracy.py's)")


def fq(w: int, a: int, kv: int, skip: str) -> str:
    return (f"fake-quant(w={w},a={a},granularity=channel,a_granularity=token,a_symmetric=true,ops=linear"
            + (f",skip={skip}" if skip else "") + (f",kv={kv}" if kv else "") + ")")


def recipes(args, skip: str = "") -> dict[str, str]:
    from benchmarks.accuracy import LLM_ROT

    tb = f"token-bits(high={args.high},low={args.low},keep={args.keep})"
    pre = f"rotate(kind=hadamard,{LLM_ROT})," if getattr(args, "rotate", False) else ""
    return {f"A{args.low} uniform": pre + fq(args.w, args.low, args.kv, skip),
            f"A{args.high} uniform": pre + fq(args.w, args.high, args.kv, skip),
            f"token-bits {args.high}/{args.low} keep {args.keep:g}": pre + fq(args.w, args.high, args.kv, skip) + "," + tb}


def run(ir0, text: str, calib) -> tuple:
    ir = copy_ir(ir0)
    res = qc.PassManager.parse(text).run(ir, qc.PassContext(calib=calib, verify=False))
    tb = ir.meta["qc"].get("token_bits")
    return ir, (tb["avg_bits"] if tb else None), res


def smollm2_rows(args) -> list[dict]:
    from benchmarks import realdata as rd
    from benchmarks.accuracy import Cache, perplexity, smollm2_tracer

    cache = Cache(args.fresh)
    model, tok = rd.load_smollm2()
    windows = rd.wiki_windows(tok, n=200 + args.calib_windows, length=512)
    evalw, calib = windows[: args.windows], [w[None] for w in windows[200: 200 + args.calib_windows]]
    wrapped = rd.LogitsOnly(model)
    n = args.windows
    rows = [{"recipe": "float", "avg_bits": 32.0,
             **cache.get(f"smollm2|float|{n}", lambda: {"ppl": perplexity(wrapped, evalw)})}]
    state = {}
    traced = smollm2_tracer(model, wrapped, evalw, state)

    for name, _ in recipes(args).items():
        def row(name=name):
            ir0 = traced()
            text = recipes(args, state["lm_head"])[name]
            ir, avg, _ = run(ir0, text, calib)
            return {"ppl": perplexity(ir, evalw), "pipeline": text,
                    "avg_bits": avg if avg is not None else float(text.split(",a=")[1].split(",")[0])}
        key = f"mixed_tokens|{name}|w{args.w}|kv{args.kv}|{n}|c{args.calib_windows}{'|rot' if args.rotate else ''}"
        rows.append({"recipe": name, **cache.get(key, row)})

    def control():  # the same widths and counts, random tokens instead of the most attended
        ir0 = traced()
        text = list(recipes(args, state["lm_head"]).values())[-1]
        ir, avg, _ = run(ir0, text, calib)
        randomize_masks(ir)
        return {"ppl": perplexity(ir, evalw), "pipeline": text + " + random masks", "avg_bits": avg}
    name = f"random tokens {args.high}/{args.low} keep {args.keep:g}"
    key = f"mixed_tokens|{name}|w{args.w}|kv{args.kv}|{n}|c{args.calib_windows}{'|rot' if args.rotate else ''}"
    rows.append({"recipe": name, **cache.get(key, control)})
    return rows


def randomize_masks(ir, seed: int = 0) -> None:
    """Control: replace every token-bits mask by a fixed random choice of as many tokens."""
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate([n for n in ir.graph.nodes if n.meta.get("qc", {}).get("role") == "token_mask"]):
        t, k = m.meta["qc"]["tokens"], m.meta["qc"]["high_tokens"]
        mask = torch.zeros(1, t, 1)
        mask[0, torch.randperm(t, generator=g)[:k]] = 1.0
        ir.register_buffer(f"random_mask_{i}", mask)
        with ir.graph.inserting_after(m):
            const = ir.graph.get_attr(f"random_mask_{i}")
        m.replace_all_uses_with(const)
    ir.graph.eliminate_dead_code()
    ir.recompile()


def latency_rows(args) -> list[dict]:
    from tests.passes.tiny_llm import TinyLM

    torch.set_num_threads(1)
    model = TinyLM(vocab=512, d=576, heads=9, kv_heads=3, hidden=1536, layers=1).eval()
    x = torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    calib = [torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    rows = []
    for name, text in recipes(args).items():
        art = qc.compile(model, (x,), pipeline=text + ",calibrate,convert", calib=calib)
        ints = sum(op_name(n) == "qc.linear_int" for n in art.ir.graph.nodes)
        art(x)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            art(x)
            times.append(time.perf_counter() - t)
        rows.append({"recipe": name, "ms": 1e3 * statistics.median(times), "linear_int": ints,
                     "max_rel_err_vs_ir": float((art(x) - art.ir(x)).abs().max() / art.ir(x).abs().max())})
    return rows


def main_tokens(args) -> dict:
    """Run the tables; options missing from `args` (a caller's own parser, e.g. mixed.py's)
    take add_args' defaults."""
    p = argparse.ArgumentParser()
    add_args(p)
    for k, v in vars(p.parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    out = {} if args.no_ppl else ppl_table(args)
    if args.block_latency:
        lat = latency_rows(args)
        print(f"\nhost latency, one SmolLM2-sized block at T={args.tokens}, W{args.w}, 1 thread "
              f"(median of {args.repeats})")
        print(f"{'recipe':34s} {'ms':>8s} {'int linears':>11s} {'max rel err vs IR':>18s}")
        for r in lat:
            print(f"{r['recipe']:34s} {r['ms']:8.2f} {r['linear_int']:11d} {r['max_rel_err_vs_ir']:18.2e}")
        out["latency"] = lat
    return out


def ppl_table(args) -> dict:
    rows = smollm2_rows(args)
    print(f"\nSmolLM2-135M{' rotated (Hadamard)' if args.rotate else ''}, W{args.w} per channel, activations per token (symmetric, run-time scales)"
          f"{f', KV{args.kv}' if args.kv else ''}; perplexity on {args.windows} windows of 512 tokens")
    print(f"{'recipe':34s} {'avg a bits':>10s} {'ppl':>10s}")
    for r in rows:
        ppl = f"{r['ppl']:10.3f}" if "ppl" in r else f"{'error':>10s}"
        print(f"{r['recipe']:34s} {r.get('avg_bits', float('nan')):10.3f} {ppl}  {r.get('error', '')}")
    by = {r["recipe"]: r.get("ppl", math.nan) for r in rows}
    tb = next(r for r in rows if r["recipe"].startswith("token-bits"))
    p4, p8, ptb = by[f"A{args.low} uniform"], by[f"A{args.high} uniform"], tb.get("ppl", math.nan)
    recovered = (p4 - ptb) / (p4 - p8) if p4 != p8 else math.nan
    log_rec = (math.log(p4) - math.log(ptb)) / (math.log(p4) - math.log(p8)) if p4 != p8 else math.nan
    print(f"gap recovered by token-bits: {recovered:.3f} of the perplexity gap, {log_rec:.3f} of the "
          f"log-perplexity gap (goal >= 0.5 at an average < 5 bits; average {tb.get('avg_bits', math.nan):.3f})")
    return {"rows": rows, "recovered": recovered, "recovered_log": log_rec}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    main_tokens(p.parse_args())
