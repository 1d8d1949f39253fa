"""Accuracy of the low-bit recipes on real models, side by side with peer quantizers.

    python benchmarks/accuracy.py                     # all models (long: see --quick)
    python benchmarks/accuracy.py --models smollm2 --quick --recipes rtn,rotate-hadamard --bits W4A4

One table per model, one row per recipe (the project's passes, run on the traced IR), one
column per bit setting, float on top and peers at the same bits below:
- SmolLM2-135M-Instruct (weights dequantized from the package's Q4_1 GGUF): perplexity on the
  first n windows of 512 tokens of gensim's Wikipedia test text (TOOLCHAIN_NOTES protocol).
  The 210 linears of the blocks are quantized (symmetric max-abs weights, per channel at
  8 bits, group 128 at 4 bits with a ragged last group of 64 for K=576; activations per
  token, dynamic, symmetric); embeddings, lm_head and attention products stay float; KV4
  adds keys per channel and values per token at 4 bits.
- all-MiniLM-L6-v2: mean / min cosine of sentence embeddings to float on n Wikipedia
  sentences, and the Spearman correlation with WordSim-353's human scores.
- EfficientNet-Lite0: top-1 agreement with float and KL(float || quantized) on augmented
  crops of the scikit-image / scikit-learn sample photos (per-tensor static activations).
`tclip` rows add `calibrate(token_clip=true)` before GPTQ: each per-token activation quantizer
gets the clip ratio (1, 0.95, .., 0.5) with the least consumer-weighted rounding error on the
calibration data (`tclipkv`: the KV cache's quantizers too). `rotate-rs` rows use randomized
Hadamards (random signs, then H) for the online rotations; `rotate-full` also rotates o_proj's
input online (a full Hadamard over the heads, on top of the per-head one). GPTQ rows use act_order, damping 0.01 and the diag(H)-weighted clip search, with Hessians from
calibration data disjoint from what is scored (SmolLM2: windows 200.. of the text; MiniLM:
running text packed into 128-token rows after the scored sentences, no padding).
Options that change every row (`--calib N` calibration rows/windows, `--a-clip` /
`--kv-clip` clip ratios of the run-time 4-bit activation / KV ranges, `--group` of the 4-bit
weights, `--a-asym` / `--kv-asym` asymmetric run-time activation / KV ranges) are appended to the row's name when they differ from their defaults (64 MiniLM rows,
4 or 8 SmolLM2 windows, no clipping, group 128), so their rows are cached apart.
Results are cached in the user cache dir (`--fresh` recomputes); `--quick` uses fewer windows,
sentences and crops. `benchmarks/accuracy_probe.py` shows, per layer, why the residual rotation
alone raises SmolLM2's 4-bit round-to-nearest error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import qcompiler as qc  # noqa: E402
from qcompiler.ir import copy_ir, op_name  # noqa: E402

from benchmarks import realdata as rd  # noqa: E402
from benchmarks import accuracy_peers as peers  # noqa: E402

BITS = {"W8A8": (8, 8, 0), "W4A8": (4, 8, 0), "W4A4": (4, 4, 0), "W4A4KV4": (4, 4, 4)}
LLM_ROT = "heads=true,keys=true,online=*.down_proj"
GPTQ = "gptq(act_order=true,damp=0.01,clip=true)"  # group: the fake-quant's (128, ragged last)
GPTQ_SEQ = "gptq(act_order=true,damp=0.01,clip=true,sequential=true)"
TOKEN_CLIP = "calibrate(token_clip=true)"  # per-layer searched clip ratios of the per-token ranges
TOKEN_CLIP_KV = "calibrate(token_clip=true,token_clip_kv=true)"  # ... and of the KV cache's
LLM_ROT_RS = f"{LLM_ROT},online_signs=true"  # randomized Hadamard (D H) for the online rotations
LLM_ROT_FULL = "heads=true,keys=true,online=*.down_proj;*.o_proj,online_signs=true"  # + o_proj's input (QuaRot)
LLM_RECIPES = {  # name -> (passes before fake-quant, passes after it)
    "rtn": ([], []),
    "smooth": (["smooth(alpha=0.5)"], []),
    "rotate-hadamard": ([f"rotate(kind=hadamard,{LLM_ROT})"], []),
    "rotate-klt": ([f"rotate(kind=klt-hadamard,{LLM_ROT})"], []),
    "gptq": ([], [GPTQ]),
    "rotate+gptq": ([f"rotate(kind=hadamard,{LLM_ROT})"], [GPTQ]),
    "rotate+gptq-seq": ([f"rotate(kind=hadamard,{LLM_ROT})"], [GPTQ_SEQ]),
    "rotate+tclip+gptq": ([f"rotate(kind=hadamard,{LLM_ROT})"], [TOKEN_CLIP, GPTQ]),
    "rotate+tclip+gptq-seq": ([f"rotate(kind=hadamard,{LLM_ROT})"], [TOKEN_CLIP, GPTQ_SEQ]),
    "rotate-rs+tclip+gptq-seq": ([f"rotate(kind=hadamard,{LLM_ROT_RS})"], [TOKEN_CLIP, GPTQ_SEQ]),
    "rotate-full+tclipkv+gptq-seq": ([f"rotate(kind=hadamard,{LLM_ROT_FULL})"], [TOKEN_CLIP_KV, GPTQ_SEQ]),
}
BERT_RECIPES = {
    "rtn": ([], []),
    "smooth": (["smooth(alpha=0.5)"], []),
    "rotate-hadamard": (["rotate(residual=false,online=*)"], []),
    "rotate-hadamard-va": (["rotate(residual=false,online=*,variance_aligned=true)"], []),
    "gptq": ([], [GPTQ]),
    "rotate+gptq": (["rotate(residual=false,online=*)"], [GPTQ]),
    "rotate+gptq-seq": (["rotate(residual=false,online=*)"], [GPTQ_SEQ]),
    "rotate+tclip+gptq": (["rotate(residual=false,online=*)"], [TOKEN_CLIP, GPTQ]),
    "rotate+tclip+gptq-seq": (["rotate(residual=false,online=*)"], [TOKEN_CLIP, GPTQ_SEQ]),
    "rotate-rs+tclip+gptq-seq": (["rotate(residual=false,online=*,online_signs=true)"], [TOKEN_CLIP, GPTQ_SEQ]),
}


def fq_text(bits: str, skip: str = "", ops: str = "linear", a_clip: float = 1.0, kv_clip: float = 1.0,
            group: int = 128, a_asym: bool = False, kv_asym: bool = False) -> str:
    """The fake-quant of a bit setting; the clip ratios apply to 4-bit activations / KV only."""
    w, a, kv = BITS[bits]
    gran = "granularity=channel" if w == 8 else f"granularity=group,group={group}"
    text = f"fake-quant(w={w},a={a},{gran},a_granularity=token,a_symmetric={str(not a_asym).lower()},ops={ops}"
    text += (f",skip={skip}" if skip else "") + (f",kv={kv}" if kv else "")
    text += (f",a_clip={a_clip}" if a <= 4 and a_clip != 1.0 else "")
    text += ",kv_symmetric=false" if kv and kv_asym else ""
    return text + (f",kv_clip={kv_clip}" if kv and kv_clip != 1.0 else "") + ")"


def row_name(name: str, args, calib_default: int) -> str:
    """The recipe's name with the options that differ from their defaults (cache key too)."""
    extra = [f"calib={args.calib}" if args.calib and args.calib != calib_default else "",
             f"a_clip={args.a_clip}" if args.a_clip != 1.0 else "",
             f"kv_clip={args.kv_clip}" if args.kv_clip != 1.0 else "",
             f"g{args.group}" if args.group != 128 else "",
             "asym" if getattr(args, "a_asym", False) else "",
             "kv_asym" if getattr(args, "kv_asym", False) else "",
             f"gptq({args.gptq})" if getattr(args, "gptq", "") else "",
             "sentcal" if getattr(args, "calib_sentences", False) else ""]
    return " ".join([name] + [e for e in extra if e])


class Cache:
    def __init__(self, fresh: bool):
        self.path = os.path.join(rd.cache_dir("accuracy"), "results.json")
        self.data = {} if fresh or not os.path.exists(self.path) else json.load(open(self.path))

    def get(self, key, fn):
        if key not in self.data or not self.data[key].get("error", "n/a").startswith("n/a"):
            t = time.time()
            try:
                self.data[key] = fn()
            except Exception as e:  # a row that fails is reported as such, not hidden
                self.data[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            self.data[key]["seconds"] = round(time.time() - t, 1)
            on_disk = json.load(open(self.path)) if os.path.exists(self.path) else {}
            on_disk[key] = self.data[key]  # other runs may have added rows meanwhile: merge
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(on_disk, f, indent=1)
            os.replace(tmp, self.path)
            print(f"  {key}: {self.data[key]}", flush=True)
        return self.data[key]


def run_pipeline(ir0, recipe, bits, calib, args, skip="", ops="linear"):
    pre, post = recipe
    if getattr(args, "gptq", ""):  # --gptq: extra options of the recipe's gptq pass
        post = [f"{p[:-1]},{args.gptq})" if p.startswith("gptq(") else p for p in post]
    ir = copy_ir(ir0)
    text = ",".join(pre + [fq_text(bits, skip, ops, args.a_clip, args.kv_clip, args.group, args.a_asym, args.kv_asym)] + post)
    ctx = qc.PassContext(calib=calib, verify=False)
    qc.PassManager.parse(text).run(ir, ctx)
    return ir, text


# ---------------------------------------------------------------- SmolLM2


def perplexity(fn, windows) -> float:
    nll = []
    with torch.no_grad():
        for w in windows:
            logits = fn(w[None])[0]
            nll.append(torch.nn.functional.cross_entropy(logits[:-1].float(), w[1:], reduction="sum"))
    return math.exp(float(torch.stack(nll).sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


def smollm2_tracer(model, wrapped, evalw, state: dict):
    """traced(): SmolLM2's IR, traced once into state["ir"]; state["lm_head"] names the
    vocabulary projection (kept float by the recipes)."""
    def traced():
        if "ir" not in state:
            state["ir"] = qc.trace(wrapped, (evalw[:1],))
            state["lm_head"] = next(x.name for x in state["ir"].graph.nodes if op_name(x) == "aten.linear"
                                    and x.meta["val"].shape[-1] == model.config.vocab_size)
        return state["ir"]
    return traced


def smollm2(args, cache: Cache) -> dict:
    model, tok = rd.load_smollm2()
    n = 4 if args.quick else 40
    windows = rd.wiki_windows(tok, n=300, length=512)
    calib_default = 4 if args.quick else 8
    if 200 + (args.calib or calib_default) > windows.shape[0]:
        raise SystemExit(f"--calib {args.calib}: at most {windows.shape[0] - 200} SmolLM2 windows")
    evalw, calib = windows[:n], [w[None] for w in windows[200: 200 + (args.calib or calib_default)]]
    wrapped = rd.LogitsOnly(model)
    table = {"float": {b: cache.get(f"smollm2|float|{n}", lambda: {"ppl": perplexity(wrapped, evalw)}) for b in BITS}}
    state = {}
    traced = smollm2_tracer(model, wrapped, evalw, state)

    for name in args.recipes or LLM_RECIPES:
        if name not in LLM_RECIPES:
            print(f"  no SmolLM2 recipe {name!r} (have: {', '.join(LLM_RECIPES)})", flush=True)
            continue
        for bits in args.bits or BITS:
            def row(name=name, bits=bits):
                ir0 = traced()
                ir, text = run_pipeline(ir0, LLM_RECIPES[name], bits, calib, args, skip=state["lm_head"])
                return {"ppl": perplexity(ir, evalw), "pipeline": text, "calib": len(calib)}
            label = row_name(name, args, calib_default)
            table.setdefault(label, {})[bits] = cache.get(f"smollm2|{label}|{bits}|{n}", row)
    if not args.no_peers:
        for bits in args.bits or BITS:
            table.setdefault("torchao", {})[bits] = cache.get(
                f"smollm2|torchao|{bits}|{n}", lambda bits=bits: peers.torchao_llm(model, bits, lambda m: perplexity(rd.LogitsOnly(m), evalw)))
    return {"n": n, "metric": "perplexity", "rows": table}


# ---------------------------------------------------------------- MiniLM


def packed_calibration(tok, sentences, count: int, length: int, batch: int = 16, each: bool = False) -> list:
    """`count` sequences of `length` tokens of running text ([CLS] sentences... [SEP], mask all
    ones), not padded sentences: padding tokens would fill most rows of the statistics
    (GPTQ's Hessians, smoothing scales) with positions the embedding never reads. `each`
    (--calib-sentences) wraps every sentence in its own [CLS] .. [SEP], as the scored inputs are."""
    ids = [t for s in sentences for t in tok(s, add_special_tokens=False)["input_ids"]]
    if each:
        ids = [t for s in sentences for t in [tok.cls_token_id] + tok(s, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    body = length - 2
    if len(ids) < count * body:
        raise ValueError(f"{len(ids)} tokens of calibration text, need {count * body}")
    rows = [[tok.cls_token_id] + ids[i * body: (i + 1) * body] + [tok.sep_token_id] for i in range(count)]
    x = torch.tensor(rows, dtype=torch.long)
    return [(x[i: i + batch], torch.ones_like(x[i: i + batch])) for i in range(0, count, batch)]


def minilm_scorer(enc, tok, sents: list[str]):
    """The scored sentences' batch and score(fn) -> {cos_mean, cos_min, spearman}: cosine of
    fn's sentence embeddings to the float encoder's, and WordSim-353's Spearman correlation."""
    from scipy.stats import spearmanr

    b = tok(sents, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    words = rd.wordsim353()
    vocab = sorted({w for a, c, _ in words for w in (a, c)})
    wb = tok(vocab, padding="max_length", truncation=True, max_length=128, return_tensors="pt")

    def embed(fn, ids, mask):
        with torch.no_grad():
            return torch.cat([fn(ids[i: i + 50], mask[i: i + 50]) for i in range(0, ids.shape[0], 50)])

    ref = embed(enc, b.input_ids, b.attention_mask)

    def score(fn):
        e = embed(fn, b.input_ids, b.attention_mask)
        cos = (e * ref).sum(-1) / (e.norm(dim=-1) * ref.norm(dim=-1))
        we = embed(fn, wb.input_ids, wb.attention_mask)
        idx = {w: i for i, w in enumerate(vocab)}
        sims = [float(torch.cosine_similarity(we[idx[a]], we[idx[c]], dim=0)) for a, c, _ in words]
        rho = spearmanr(sims, [s for _, _, s in words]).statistic
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "spearman": float(rho)}

    return b, score


def minilm(args, cache: Cache) -> dict:
    bert, tok = rd.load_minilm()
    n = 100 if args.quick else 500
    enc = rd.MiniLMEncoder(bert).eval()
    b, score = minilm_scorer(enc, tok, rd.wiki_sentences(n))
    rows = args.calib or 64
    calib = packed_calibration(tok, rd.wiki_sentences(n + 600 * -(-rows // 64))[n:], rows, 128,
                               each=getattr(args, "calib_sentences", False))

    table = {"float": {bt: cache.get(f"minilm|float|{n}", lambda: score(enc)) for bt in BITS}}
    state = {}

    def traced():
        if "ir" not in state:
            state["ir"] = qc.trace(enc, (b.input_ids[:2], b.attention_mask[:2]))
        return state["ir"]

    for name in args.recipes or BERT_RECIPES:
        if name not in BERT_RECIPES:
            print(f"  no MiniLM recipe {name!r} (have: {', '.join(BERT_RECIPES)})", flush=True)
            continue
        for bits in args.bits or BITS:
            def row(name=name, bits=bits):
                ir, text = run_pipeline(traced(), BERT_RECIPES[name], bits, calib, args)
                return {**score(ir), "pipeline": text, "calib": rows}
            label = row_name(name, args, 64)
            table.setdefault(label, {})[bits] = cache.get(f"minilm|{label}|{bits}|{n}", row)
    if not args.no_peers:
        table["onnxruntime"] = {"W8A8": cache.get(f"minilm|onnxruntime|W8A8|{n}", lambda: peers.ort_dynamic(enc, (b.input_ids[:2], b.attention_mask[:2]), score))}
    return {"n": n, "metric": "cosine mean / min, WordSim Spearman", "rows": table}


# ---------------------------------------------------------------- EfficientNet-Lite0


def efficientnet(args, cache: Cache) -> dict:
    model = rd.load_efficientnet_lite0()
    crops = 2 if args.quick else 8
    imgs = rd.sample_images(crops=crops)
    calib_imgs = rd.sample_images(crops=2, seed=1)
    calib = [calib_imgs[i: i + 8] for i in range(0, calib_imgs.shape[0], 8)]
    with torch.no_grad():
        ref = torch.cat([model(imgs[i: i + 16]) for i in range(0, imgs.shape[0], 16)])

    def score(fn):
        with torch.no_grad():
            out = torch.cat([fn(imgs[i: i + 16]) for i in range(0, imgs.shape[0], 16)])
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        kl = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"))
        return {"top1_agree": agree, "kl": kl}

    ir0 = qc.trace(model, (imgs[:2],))
    table = {"float": {bt: {"top1_agree": 1.0, "kl": 0.0} for bt in ("W8A8", "W4A8", "W4A4")}}
    for name, obs in (("rtn-minmax", "minmax"), ("rtn-kl", "kl"), ("rtn-mse", "mse")):
        for bits in ("W8A8", "W4A8", "W4A4"):
            w, a, _ = BITS[bits]

            def row(w=w, a=a, obs=obs):
                ir = copy_ir(ir0)
                text = f"fold-batchnorm,fake-quant(w={w},a={a}),calibrate(observer={obs})"
                qc.PassManager.parse(text).run(ir, qc.PassContext(calib=calib, verify=False))
                return {**score(ir), "pipeline": text}
            table.setdefault(name, {})[bits] = cache.get(f"effnet|{name}|{bits}|{crops}", row)
    if not args.no_peers:
        table["onnxruntime"] = {"W8A8": cache.get(f"effnet|onnxruntime|W8A8|{crops}", lambda: peers.ort_static(model, imgs[:2], calib, score))}
    return {"n": imgs.shape[0], "metric": "top-1 agreement / KL", "rows": table}


# ---------------------------------------------------------------- tables


def _fmt(model: str, v: dict) -> str:
    if not v:
        return "-"
    if "error" in v:
        return "error"
    if model == "smollm2":
        return f"{v['ppl']:.2f}"
    if model == "minilm":
        return f"{v['cos_mean']:.4f}/{v['cos_min']:.3f}/{v['spearman']:.3f}"
    return f"{v['top1_agree']:.3f}/{v['kl']:.4f}"


def print_table(model: str, res: dict) -> None:
    cols = [b for b in BITS if any(b in r for r in res["rows"].values())]
    print(f"\n## {model} ({res['metric']}, n={res['n']})")
    print("| recipe | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in res["rows"].items():
        print(f"| {name} | " + " | ".join(_fmt(model, row.get(b, {})) for b in cols) + " |")
    errors = [(n, b, v["error"]) for n, r in res["rows"].items() for b, v in r.items() if "error" in v]
    for n, b, e in errors:
        print(f"  {n} {b}: {e}")


def cached_tables(cache: Cache, args) -> None:
    sizes = {"smollm2": 4 if args.quick else 40, "minilm": 100 if args.quick else 500,
             "efficientnet": 2 if args.quick else 8}
    metric = {"smollm2": "perplexity", "minilm": "cosine mean / min, WordSim Spearman",
              "efficientnet": "top-1 agreement / KL"}
    short = {"smollm2": "smollm2", "minilm": "minilm", "efficientnet": "effnet"}
    for model in args.models.split(","):
        rows: dict = {}
        for key, v in cache.data.items():
            m, recipe, *rest = key.split("|")
            if m != short[model] or rest[-1] != str(sizes[model]):
                continue
            for bits in ([rest[0]] if len(rest) == 2 else list(BITS)):
                rows.setdefault(recipe, {})[bits] = v
        order = ["float"] + [r for r in rows if r not in ("float", "torchao", "onnxruntime")] + ["torchao", "onnxruntime"]
        print_table(model, {"n": sizes[model], "metric": metric[model], "rows": {r: rows[r] for r in order if r in rows}})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,minilm,efficientnet")
    p.add_argument("--recipes", type=lambda s: s.split(","), default=None)
    p.add_argument("--bits", type=lambda s: s.split(","), default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--calib", type=int, default=0, help="calibration rows (MiniLM, default 64) or windows "
                   "(SmolLM2, default 8, 4 with --quick)")
    p.add_argument("--a-clip", type=float, default=1.0, help="clip ratio of run-time 4-bit activation ranges")
    p.add_argument("--kv-clip", type=float, default=1.0, help="clip ratio of the 4-bit KV cache's ranges")
    p.add_argument("--group", type=int, default=128, help="group of the 4-bit weights")
    p.add_argument("--a-asym", action="store_true", help="asymmetric run-time activation (and KV) ranges "
                   "(min/max with a zero point; float simulation after convert)")
    p.add_argument("--kv-asym", action="store_true", help="asymmetric KV cache ranges (kv_symmetric=false)")
    p.add_argument("--gptq", default="", help="options appended to the recipes' gptq pass, e.g. "
                   "refit=2,search=4 (part of the row name)")
    p.add_argument("--calib-sentences", action="store_true", help="MiniLM calibration rows of whole "
                   "[CLS] sentence [SEP] units instead of running text (part of the row name)")
    p.add_argument("--table", action="store_true", help="only print the tables of what is cached")
    args = p.parse_args(argv)
    if args.calib < 0:
        p.error(f"--calib {args.calib}: give a positive count (0 = the model's default)")
    for opt in ("a_clip", "kv_clip"):
        if not 0 < getattr(args, opt) <= 1:
            p.error(f"--{opt.replace('_', '-')} {getattr(args, opt)}: give a clip ratio in (0, 1]")
    torch.manual_seed(0)
    cache = Cache(args.fresh)
    if args.table:
        return cached_tables(cache, args)
    runners = {"smollm2": smollm2, "minilm": minilm, "efficientnet": efficientnet}
    results = {m: runners[m](args, cache) for m in args.models.split(",")}
    for m, res in results.items():
        print_table(m, res)


if __name__ == "__main__":
    main()
