"""QAT side by side with PTQ at the same bits: prints markdown tables.

Fashion-MNIST CNN (Debian package `dataset-fashion-mnist`, `/usr/share/datasets/fashion-mnist`):
a two-conv CNN with batch norm trained in float until validation accuracy stops improving
(weights cached under the user cache dir), then at W4A4 and W2A4: PTQ (fold-batchnorm,
fake-quant, calibrate with the mse observer, convert) against QAT from that same PTQ state
with the task loss, with distillation from the float model, and with oscillation damping and
freezing; every QAT row trains the same number of steps on the same batches. Accuracies are
of the converted integer IR (what deploys) on the 10,000 test images; the fake-quant IR's
accuracy is shown beside it (they agree: `qat` snaps biases to the integer grid).

SmolLM2-135M (`--smollm2`, needs the `models` extra and benchmarks/realdata.py): perplexity
on the first `--windows` windows of 512 tokens of gensim's Wikipedia text (the issue's float
22.85 is over 40) at W4A4KV4 and W4A8 as benchmarks/accuracy.py defines them, PTQ vs a short
distillation QAT vs QAT with EdgeQAT's losses (training sequences of `--seq` tokens taken after
the first 40 windows; the training IR is calibrated on the same text cut to that length),
optionally on top of Hadamard rotations (`--rotate only|both`), with the entropy of the
quantized keys' integer codes before and after, the measured steps/s and the peak resident
memory; qat's progress bar (loss, steps/s) goes to stderr every 30 s.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/qat.py [--steps 600] [--bits w4a4,w2a4]
    flock /tmp/qc_smollm2.lock nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qat.py --smollm2 \
        --recipes w4a4kv4 --rotate only --windows 4 --steps 60 --lr 1e-5 --lr-quant 1e-4 > smollm2.log 2>&1 &

all-MiniLM-L6-v2: benchmarks/qat_minilm.py.

(On a machine shared by several jobs, OMP_NUM_THREADS=1 avoids OpenMP threads spinning
against each other, which made training ~10x slower here.)
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcompiler as qc  # noqa: E402
from qcompiler.ir import copy_ir  # noqa: E402
from qcompiler.passes.qat_graph import qk_entropy  # noqa: E402
from realdata import cache_dir  # noqa: E402  (the user cache dir, shared with the other benchmarks)

FASHION = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- Fashion-MNIST


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 7 * 7, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _idx(name: str) -> np.ndarray:
    path = os.path.join(FASHION, name)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: apt-get install dataset-fashion-mnist (Debian)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist():
    """(x_train, y_train, x_test, y_test): images [N, 1, 28, 28] normalized, labels int64."""
    def images(name):
        x = torch.from_numpy(_idx(name).copy()).float().unsqueeze(1) / 255.0
        return (x - 0.2860) / 0.3530

    def labels(name):
        return torch.from_numpy(_idx(name).astype(np.int64))

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def accuracy(fn, x, y, batch: int = 1000) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((fn(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return correct / len(x)


def float_model(x, y, max_epochs: int = 20, patience: int = 2):
    """The float CNN trained with Adam until validation accuracy (last 5,000 training images)
    has not improved for `patience` epochs; cached. Returns (model, info)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_dir("fashion-mnist"), "cnn-float.safetensors")
    model = FashionCNN()
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.eval(), "cached"
    torch.manual_seed(0)
    xt, yt, xv, yv = x[:55000], y[:55000], x[55000:], y[55000:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best, best_state, since, epoch = 0.0, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(xt)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        model.eval()
        acc = accuracy(model, xv, yv)
        print(f"  float epoch {epoch}: validation {acc:.4f}", flush=True)
        if acc > best:
            best, best_state, since = acc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            since += 1
            if since >= patience:
                break
            for g in opt.param_groups:  # plateau: smaller steps
                g["lr"] *= 0.3
    model.load_state_dict(best_state)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval(), f"{epoch} epochs, best validation {best:.4f}"


def qat_rows(args) -> list[tuple[str, str]]:
    damp, freeze = args.osc.split(",")
    rows = {"task": ("QAT (task loss)", "loss=task"),
            "distill": ("QAT + distillation", "loss=distill,task_weight=1"),
            "osc": ("QAT + oscillation damping/freezing", f"loss=task,damp={damp},freeze={freeze}")}
    return [rows[m] for m in args.methods.split(",")]


def cnn_table(args) -> None:
    x, y, xt, yt = fashion_mnist()
    t0 = time.perf_counter()
    model, info = float_model(x, y)
    print(f"float CNN: {info} ({time.perf_counter() - t0:.0f} s)")
    float_acc = accuracy(model, xt, yt)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(55000, generator=g)
    train = [(x[i], y[i]) for i in perm.split(args.batch) if len(i) == args.batch]
    calib = [b for b, _ in train[:8]]
    rows = [("float", "", float_acc, float_acc, None, None)]
    for recipe in args.bits.split(","):
        w, a = (int(v) for v in recipe.lower().lstrip("w").split("a"))
        ir0 = qc.trace(model, (xt[:2],))
        qc.PassManager.parse(f"fold-batchnorm,fake-quant(w={w},a={a}),calibrate(observer=mse)").run(
            ir0, qc.PassContext(calib=calib))
        integer = copy_ir(ir0)
        qc.PassManager.parse("convert").run(integer, qc.PassContext())
        ptq = accuracy(integer, xt, yt)
        rows.append((f"W{w}A{a}", "PTQ (mse observer)", accuracy(ir0, xt, yt), ptq, None, None))
        for name, opts in qat_rows(args):
            ir = copy_ir(ir0)
            ctx = qc.PassContext(train=train, calib=calib, verify=False)
            text = f"qat(steps={args.steps},lr={args.lr},lr_quant={args.lr_quant},{opts})"
            qc.PassManager.parse(text).run(ir, ctx)
            res = ctx.results[-1][1]
            fq_acc = accuracy(ir, xt, yt)
            qc.PassManager.parse("convert").run(ir, qc.PassContext(verify=False))
            osc = res.details["oscillation"]
            note = f"frozen {osc['frozen']:.2%}" if "damp" in opts and osc.get("tracked") else ""
            rows.append((f"W{w}A{a}", f"{name} `{opts}`", fq_acc, accuracy(ir, xt, yt), res.details["steps_per_s"], note))
            print(f"  {rows[-1]}", flush=True)
    print(f"\nFashion-MNIST CNN, test accuracy on 10,000 images; QAT: {args.steps} steps of batch {args.batch}, "
          f"lr {args.lr}, lr_quant {args.lr_quant} (cosine), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}\n")
    print("| bits | method | fake-quant acc | integer acc | loss closed vs PTQ | steps/s | notes |")
    print("|---|---|---|---|---|---|---|")
    ptq_int = None
    for bits, method, fq_acc, int_acc, sps, note in rows:
        if method.startswith("PTQ"):
            ptq_int = int_acc
        closed = ""
        if method.startswith("QAT") and ptq_int is not None and float_acc > ptq_int:
            closed = f"{(int_acc - ptq_int) / (float_acc - ptq_int):.0%}"
        print(f"| {bits} | {method or 'float'} | {fq_acc:.4f} | {int_acc:.4f} | {closed} | "
              f"{'' if sps is None else f'{sps:.1f}'} | {note or ''} |")


# ---------------------------------------------------------------- SmolLM2-135M

# SmolLM2 recipes as benchmarks/accuracy.py defines them (so the float 22.85, RTN ~13000
# and rotation ~207 compare): weights group 128 symmetric, activations per token symmetric
# (dynamic, so only the weight scales are learned), lm_head left float; W4A4KV4 adds the KV
# cache at 4 bits (keys per channel, values per token), whose quantized keys are what EdgeQAT's
# losses act on (the queries stay float in this recipe).
SMOLLM2_BITS = {"w4a8": "W4A8", "w4a4kv4": "W4A4KV4"}
ROTATE = "rotate(kind=hadamard,heads=true,keys=true,online=*.down_proj)"


def smollm2_recipe(recipe: str, skip: str, rotate: bool, kv_clip: float = 1.0, ptq: str = "",
                   a_asym: bool = False, kv_asym: bool = False, rotate_text: str = ROTATE) -> str:
    """The PTQ pipeline QAT starts from: rotations, fake-quant, then the `ptq` passes (e.g.
    sequential GPTQ), then calibrate."""
    from accuracy import fq_text

    text = (f"{rotate_text}," if rotate else "") + fq_text(SMOLLM2_BITS[recipe], skip, kv_clip=kv_clip,
                                                           a_asym=a_asym, kv_asym=kv_asym)
    return text + (f",{ptq}" if ptq else "") + ",calibrate"


def progress_to_log(every: float = 30.0) -> None:
    """Show qat's progress bar (loss, steps/s) even when stderr is a log file, every `every` s."""
    from qcompiler.passes import qat as qat_pass

    plain = qat_pass.tqdm

    def bar(*a, **k):
        k["disable"] = False if k.get("disable") is None else k["disable"]
        return plain(*a, **{**k, "mininterval": every, "leave": True})

    qat_pass.tqdm = bar


def lm_head(ir, vocab: int) -> str:
    from qcompiler.ir import op_name

    return next(n.name for n in ir.graph.nodes if op_name(n) == "aten.linear" and n.meta["val"].shape[-1] == vocab)


def perplexity(fn, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = fn(w[None])
            nll += float(nn.functional.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum"))
            count += len(w) - 1
    return float(np.exp(nll / count))


def transfer(src, dst) -> int:
    """Copy src's tensors into dst where names and shapes agree (IRs traced at two lengths
    share weights and quantizers; constants sized by the length differ); returns how many."""
    theirs = dst.state_dict()
    mine = {k: v for k, v in src.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
    dst.load_state_dict(mine, strict=False)
    return len(mine)


def clip_ratios(ir) -> dict[str, float]:
    """The clip ratio of each run-time quantizer of the IR (graph constants, which
    load_state_dict does not carry), by node name."""
    from qcompiler.passes.calibrate import ClipSearch

    return {n.name: float(n.meta["qc"].get("clip", 1.0)) for n in ir.graph.nodes if ClipSearch.applies(n, kv=True)}


def set_clip_ratios(ir, ratios: dict[str, float]) -> None:
    """Write clip ratios (by node name: IRs traced at two lengths name their nodes alike)."""
    from qcompiler.passes.calibrate import set_clip_ratio

    nodes = {n.name: n for n in ir.graph.nodes}
    missing = sorted(set(ratios) - set(nodes))
    if missing:
        raise SystemExit(f"the evaluation IR has no quantizer {missing[0]} (of {len(missing)}) of the training IR")
    for name, c in ratios.items():
        set_clip_ratio(nodes[name], c)
    ir.recompile()


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def smollm2_table(args) -> None:
    """PTQ vs distillation QAT vs EdgeQAT QAT on SmolLM2-135M, optionally on top of Hadamard
    rotations. QAT trains an IR traced at `--seq` tokens; its tensors are loaded into the IR
    traced at 512 tokens for evaluation. Rows are printed as they finish."""
    from realdata import LogitsOnly, load_smollm2, wiki_windows

    progress_to_log()
    model, tok = load_smollm2()
    ids = wiki_windows(tok, n=40 + args.train_windows, length=512)  # training text after the 40 evaluation windows
    evals, train_ids = ids[: args.windows], ids[40:].reshape(-1, args.seq)
    train = [(t[None],) for t in train_ids]
    if not 0 < args.calib <= args.train_windows:
        raise SystemExit(f"--calib {args.calib}: give 1..--train-windows ({args.train_windows}) windows")
    calib = [w[None] for w in ids[40:40 + args.calib]]  # the start of the training text
    calib_tr = [w[None] for w in ids[40:40 + args.calib].reshape(-1, args.seq)]  # the same text at the training length
    wrapped = LogitsOnly(model)
    t0 = time.perf_counter()
    rows = [("float", "", perplexity(wrapped, evals), {}, None, "")]
    print(f"  float ppl {rows[0][2]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    skip = None
    for recipe in args.recipes.split(","):
        for rotate in ([False, True] if args.rotate == "both" else [args.rotate == "only"]):
            ev = qc.trace(wrapped, (evals[:2],))
            skip = skip or lm_head(ev, model.config.vocab_size)
            text = smollm2_recipe(recipe, skip, rotate, args.kv_clip, args.ptq, args.a_asym, args.kv_asym,
                                  args.rotate_text or ROTATE)
            name = ("rotate + " if rotate else "") + recipe + (" asym" if args.a_asym else "") + (
                " kv-asym" if args.kv_asym else "") + (f" calib={args.calib}" if args.calib != 4 else "")
            print(f"  {name}: {text}", flush=True)
            t0 = time.perf_counter()
            try:
                qc.PassManager.parse(text).run(ev, qc.PassContext(calib=calib, verify=False))
            except qc.PassError as e:
                rows.append((name, f"not run: {str(e).splitlines()[0][:100]}", float("nan"), {}, None, ""))
                print(f"  {rows[-1]}", flush=True)
                continue
            ptq_state = {k: v.clone() for k, v in ev.state_dict().items()}
            rows.append((name, "PTQ", perplexity(ev, evals), qk_entropy(ev, [(evals[:1],)]), None, ""))
            print(f"  {rows[-1][:3]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            losses = [x for x in args.losses.split(",") if x and x != "none"]
            if not losses:  # PTQ rows only
                continue
            tr = qc.trace(wrapped, (train_ids[:2],))
            qc.PassManager.parse(text).run(tr, qc.PassContext(calib=calib_tr, verify=False))
            transfer(ev, tr)  # QAT starts from exactly the PTQ row's model (its GPTQ-rounded weights, clips)
            tr_state = {k: v.clone() for k, v in tr.state_dict().items()}
            tr_clips, ptq_clips = clip_ratios(tr), clip_ratios(ev)
            for loss in losses:
                tr.load_state_dict(tr_state)
                set_clip_ratios(tr, tr_clips)
                ctx = qc.PassContext(train=train, verify=False)
                opts = (f"steps={args.steps},lr={args.lr},lr_quant={args.lr_quant},loss={loss},data=train"
                        + (f",{args.qat_extra}" if args.qat_extra else ""))
                t0 = time.perf_counter()
                try:
                    qc.PassManager.parse(f"qat({opts})").run(tr, ctx)
                except qc.PassError as e:
                    rows.append((name, f"QAT {loss}: not run ({str(e).splitlines()[0][:100]})", float("nan"), {}, None, ""))
                    continue
                moved = transfer(tr, ev)
                d = ctx.results[-1][1].details
                set_clip_ratios(ev, d["clip_ratios"])  # learned with lr_clip > 0
                curve = d["losses"]
                head, tail = np.mean(curve[:10]), np.mean(curve[-10:])
                learned = [d["clip_ratios"][k] / ptq_clips[k] for k in d["clip_ratios"]]
                moved_clips = (f"clip ratios x{min(learned):.3f}..x{max(learned):.3f} of PTQ's "
                               f"(mean x{np.mean(learned):.3f}); " if learned else "")
                rows.append((name, f"QAT {loss} `{opts}`", perplexity(ev, evals), qk_entropy(ev, [(evals[:1],)]),
                             d["steps_per_s"], f"loss {head:.3g} -> {tail:.3g} (mean of first/last 10); "
                             f"{moved_clips}peak RSS so far {peak_rss_gb():.1f} GB"))
                print(f"  {rows[-1][:3]} {rows[-1][4:]} ({time.perf_counter() - t0:.0f} s, {moved} tensors moved)",
                      flush=True)
                ev.load_state_dict(ptq_state)
                set_clip_ratios(ev, ptq_clips)
    print(f"\nSmolLM2-135M perplexity on the first {args.windows} windows of 512 tokens (gensim Wikipedia); "
          f"QAT on {len(train)} sequences of {args.seq} tokens taken after the first 40 windows, batch 1, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}\n")
    print("| recipe | method | perplexity | key code entropy (bits, mean over layers) | steps/s | notes |")
    print("|---|---|---|---|---|---|")
    for recipe, method, ppl, ent, sps, note in rows:
        e = f"{np.mean(list(ent.values())):.3f} ({len(ent)} quantizers)" if ent else ""
        print(f"| {recipe} | {method or 'float'} | {ppl:.2f} | {e} | {'' if sps is None else f'{sps:.3f}'} | {note} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="w4a4,w2a4")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-quant", type=float, default=1e-3)
    p.add_argument("--methods", default="task,distill,osc", help="QAT rows: task, distill, osc")
    p.add_argument("--osc", default="0.001,0.02", help="damp,freeze of the oscillation row")
    p.add_argument("--smollm2", action="store_true", help="run the SmolLM2-135M part instead of the CNN")
    p.add_argument("--seq", type=int, default=128, help="SmolLM2 training sequence length")
    p.add_argument("--windows", type=int, default=40, help="SmolLM2 evaluation windows of 512 tokens")
    p.add_argument("--train-windows", type=int, default=8, help="SmolLM2 training text, in windows of 512")
    p.add_argument("--recipes", default="w4a4kv4,w4a8")
    p.add_argument("--losses", default="distill,edgeqat", help="SmolLM2 QAT rows (none: PTQ rows only)")
    p.add_argument("--rotate", default="off", choices=["off", "only", "both"],
                   help="SmolLM2: Hadamard rotations before fake-quant (off, only, both: with and without)")
    p.add_argument("--ptq", default="", help="SmolLM2: passes after fake-quant that QAT starts from, e.g. "
                   "'calibrate(token_clip=true),gptq(act_order=true,clip=true,sequential=true)'")
    p.add_argument("--kv-clip", type=float, default=1.0, help="SmolLM2: fake-quant's kv_clip (KV ranges scaled by it)")
    p.add_argument("--a-asym", action="store_true", help="SmolLM2: asymmetric per-token activations")
    p.add_argument("--kv-asym", action="store_true", help="SmolLM2: asymmetric KV cache (kv_symmetric=false)")
    p.add_argument("--rotate-text", default="", help=f"SmolLM2: the rotate pass of --rotate (default {ROTATE})")
    p.add_argument("--calib", type=int, default=4, help="SmolLM2: calibration windows of 512 (the start of the "
                   "training text)")
    p.add_argument("--qat-extra", default="", help="more SmolLM2 qat options, e.g. lora_rank=8 or train_weights=false")
    args = p.parse_args(argv)
    if args.smollm2:
        smollm2_table(args)
    else:
        cnn_table(args)


if __name__ == "__main__":
    main()
