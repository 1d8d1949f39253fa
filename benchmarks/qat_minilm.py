"""all-MiniLM-L6-v2 at low bits: PTQ vs distillation QAT from that PTQ state (prints a table).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/qat_minilm.py --steps 300 --lr 5e-5 --lr-quant 1e-5 \
        --qat quantizers=lsq

PTQ is a recipe of benchmarks/accuracy.py (default rotate-rs+tclip+gptq-seq at W4A8), scored
as accuracy.py scores MiniLM: mean / min cosine of sentence embeddings to float on the first
500 Wikipedia sentences of gensim's test text, and the WordSim-353 Spearman correlation.
Calibration rows are running text after the scored sentences; training uses the sentences
after those, one per row, padded to 128 tokens as the scored ones are. The QAT output loss is
the normalized MSE of the (unit) sentence embeddings, i.e. 2 (1 - cosine); the teacher is the
float model (qat's default, which reads the float weights gptq replaced).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcompiler as qc  # noqa: E402

import accuracy as acc  # noqa: E402
from qat import progress_to_log  # noqa: E402
from realdata import MiniLMEncoder, load_minilm, wiki_sentences  # noqa: E402


def minilm_table(args) -> None:
    progress_to_log()
    bert, tok = load_minilm()
    enc = MiniLMEncoder(bert).eval()
    n, rows = 500, args.calib
    cal_sents = 600 * -(-rows // 64)  # as accuracy.py takes them
    sents = wiki_sentences(n + cal_sents + args.train)
    if len(sents) < n + cal_sents + args.train:
        raise SystemExit(f"the text has {len(sents) - n - cal_sents} sentences after the scored and calibration "
                         f"ones; give --train <= that")
    b, scores = acc.minilm_scorer(enc, tok, sents[:n])
    calib = acc.packed_calibration(tok, sents[n:n + cal_sents], rows, 128)
    tb = tok(sents[n + cal_sents:], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    bs = args.batch
    train = [(tb.input_ids[i:i + bs], tb.attention_mask[i:i + bs]) for i in range(0, tb.input_ids.shape[0], bs)]

    def score(fn) -> tuple[float, float, float]:
        r = scores(fn)
        return r["cos_mean"], r["cos_min"], r["spearman"]

    table = [("float", "", score(enc), "")]
    traced = qc.trace(enc, (b.input_ids[:2], b.attention_mask[:2]))
    opts = (f"steps={args.steps},lr={args.lr},lr_quant={args.lr_quant},loss=distill,output_loss=mse,data=train"
            + (f",{args.qat}" if args.qat else ""))
    settings = argparse.Namespace(a_clip=1.0, kv_clip=1.0, group=128, a_asym=False, kv_asym=False, gptq="")
    for bits in args.bits.split(","):
        t0 = time.perf_counter()
        ir, text = acc.run_pipeline(traced, acc.BERT_RECIPES[args.recipe], bits, calib, settings)
        table.append((f"{args.recipe} {bits}, calib {rows}", "PTQ", score(ir), f"`{text}`"))
        print(f"  {table[-1][:3]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        t0 = time.perf_counter()
        ctx = qc.PassContext(train=train, verify=False)
        qc.PassManager.parse(f"qat({opts})").run(ir, ctx)
        d = ctx.results[-1][1].details
        curve = d["losses"]
        table.append((table[-1][0], f"QAT `{opts}`", score(ir),
                      f"loss {np.mean(curve[:10]):.4f} -> {np.mean(curve[-10:]):.4f} (mean of first/last 10), "
                      f"{d['steps_per_s']:.3f} steps/s"))
        print(f"  {table[-1][:3]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nall-MiniLM-L6-v2: cosine of sentence embeddings to float on {n} Wikipedia sentences, WordSim-353 "
          f"Spearman; QAT on {len(train) * bs} sentences after them, batch {bs}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}\n")
    print("| recipe | method | cosine mean | cosine min | WordSim Spearman | notes |")
    print("|---|---|---|---|---|---|")
    for recipe, method, (mean, low, rho), note in table:
        print(f"| {recipe} | {method or 'float'} | {mean:.4f} | {low:.4f} | {rho:.3f} | {note} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="W4A8", help="bit settings of benchmarks/accuracy.py, comma-separated")
    p.add_argument("--recipe", default="rotate-rs+tclip+gptq-seq", choices=sorted(acc.BERT_RECIPES))
    p.add_argument("--calib", type=int, default=256, help="calibration rows of 128 tokens")
    p.add_argument("--train", type=int, default=4800, help="training sentences")
    p.add_argument("--batch", type=int, default=16, help="training batch (sentences)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-quant", type=float, default=1e-5)
    p.add_argument("--qat", default="quantizers=lsq", help="more qat options")
    minilm_table(p.parse_args(argv))


if __name__ == "__main__":
    main()
