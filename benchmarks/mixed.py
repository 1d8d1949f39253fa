"""Mixed precision: HAWQ's per-layer widths vs uniform and random ones at equal size and latency.

HAWQ's per-layer weight widths against uniform widths and random allocations at the same size,
and under a latency budget on host and arm; prints tables and writes a Pareto plot
(matplotlib, Agg).

Models and data:
- Fashion-MNIST CNN (benchmarks/qat.py's model, float weights cached; Debian package
  `dataset-fashion-mnist`): accuracy of the converted integer IR (what deploys; the backends
  equal it bit for bit) on the 10,000 test images; calibration = 4 x 64 training images.
- EfficientNet-Lite0 (`models` extra; benchmarks/realdata.py): top-1 agreement with the float
  model and KL(float || quantized) on augmented crops of the scikit-image/scikit-learn photos
  (as benchmarks/accuracy.py), calibration on other crops.

Every configuration is `fold-batchnorm`, then widths (uniform, random, or `hawq`'s), then
`fake-quant(a=8),calibrate,convert` (weights per output channel, activations 8-bit per tensor).
- size: HAWQ with budget_kb = the uniform 4-bit model's weight size vs uniform 4-bit and vs
  `--random` random allocations (2/4/8 bits drawn per layer, not all one width, size within
  85-100% of it; one per seed); HAWQ's Pareto frontier is evaluated point by point for the plot.
- latency (`--latency host,arm`, CNN; EfficientNet with `--effnet-latency`): HAWQ with
  budget_latency = the uniform 4-bit model's summed per-layer cost (host ms timed, arm
  instructions counted under QEMU; table cached beside the tuning database), then the whole
  model compiled for the target and measured (host: min of up to 200 runs at batch 1, ms; arm:
  instructions executed in the model's kernels).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/mixed.py [--models cnn,effnet] \
        [--latency host,arm] [--png mixed_pareto.png] [--smollm2]

Hessian cost: hawq's default estimator takes one Hessian-vector product per layer and sample;
on EfficientNet-Lite0 (50 layers, 4 crops per product) 4 samples took 442 s on a loaded
2-core machine. The numbers in docs/architecture.md come from
    ... mixed.py --models cnn --png cnn.png
    ... mixed.py --models effnet --latency '' --samples 4 --hawq "estimator=layer,batches=1,min_samples=3" \
        --skip-uniform "2;8" --frontier-evals 4 --random 1
(uniform 2- and 8-bit from an earlier run of the same configurations).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcompiler as qc  # noqa: E402
from qcompiler.ir import copy_ir, op_name  # noqa: E402
from qcompiler.passes import hawq_cost  # noqa: E402
from benchmarks import mixed_tokens  # noqa: E402

BITS = (2, 4, 8)
TAIL = "fake-quant(a=8),calibrate,convert"


def table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])


# ---------------------------------------------------------------- the models


def cnn():
    from qat import accuracy, fashion_mnist, float_model

    x, y, xt, yt = fashion_mnist()
    model, _ = float_model(x, y)
    calib = [x[i: i + 64] for i in range(0, 256, 64)]
    return {"name": "Fashion-MNIST CNN", "model": model, "example": x[:1], "calib": calib,
            "metric": "accuracy", "score": lambda fn: {"accuracy": accuracy(fn, xt, yt)}, "key": "accuracy",
            "samples": 100}


def effnet():
    import realdata as rd

    model = rd.load_efficientnet_lite0()
    imgs = rd.sample_images(crops=8)
    calib_imgs = rd.sample_images(crops=2, seed=1)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in imgs.split(16)])

    def score(fn):
        with torch.no_grad():
            out = torch.cat([fn(b) for b in imgs.split(16)])
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        kl = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                              reduction="batchmean"))
        return {"agreement": agree, "kl": kl}

    return {"name": "EfficientNet-Lite0", "model": model, "example": imgs[:1],
            "calib": [calib_imgs[i: i + 4] for i in range(0, 16, 4)], "metric": "top-1 agreement / KL",
            "score": score, "key": "agreement", "samples": 4, "hawq": "batches=1,min_samples=3"}


# ---------------------------------------------------------------- configurations


def folded(m) -> torch.fx.GraphModule:
    ir = qc.trace(m["model"], (m["example"],))
    qc.PassManager.parse("fold-batchnorm").run(ir, qc.PassContext(verify=False))
    return ir


def layer_nodes(ir):
    return [n for n in ir.graph.nodes if op_name(n) in hawq_cost.KINDS and n.args[1].op == "get_attr"]


def convert_with(ir0, m, bits: dict):
    """The folded float IR with these widths through fake-quant, calibrate, convert."""
    ir = copy_ir(ir0)
    for n in layer_nodes(ir):
        n.meta.setdefault("qc", {})["w_bits"] = bits[n.name]
    qc.PassManager.parse(TAIL).run(ir, qc.PassContext(calib=m["calib"], verify=False))
    return ir


def size_kb(layers, bits: dict) -> float:
    return sum(hawq_cost.size_bytes(l, bits[l.name], 0) for l in layers) / 1024


def random_allocation(layers, budget: float, seed: int, draws: int = 5000) -> dict | None:
    """A uniformly random 2/4/8 assignment whose size is within 85-100% of `budget` KiB and that
    is not one width everywhere (the first of `draws` tries; None if none fits)."""
    rng = random.Random(seed)
    for _ in range(draws):
        bits = {l.name: rng.choice(BITS) for l in layers}
        if len(set(bits.values())) > 1 and 0.85 * budget <= size_kb(layers, bits) <= budget:
            return bits
    return None


def add(rows: list, row: tuple) -> None:
    """Append a table row and print it at once (a long run shows its progress)."""
    rows.append(row)
    print("  row: " + " | ".join(map(str, row)), flush=True)


def spread(points: list, n: int) -> list:
    """At most n of the points, evenly spread (ends kept)."""
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


def run_hawq(ir0, m, option: str):
    ir = copy_ir(ir0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.time()
        extra = f",{m['hawq']}" if m.get("hawq") else ""
        qc.PassManager.parse(f"hawq({option},max_samples={m['samples']}{extra})").run(
            ir, qc.PassContext(calib=m["calib"], verify=False))
        took = time.time() - t
    for w in caught:
        print(f"  warning: {w.message}", flush=True)
    return ir.meta["qc"]["hawq"], took


def fmt_score(s: dict) -> str:
    return " / ".join(f"{v:.4f}" for v in s.values())


# ---------------------------------------------------------------- size


def size_rows(m, ir0, layers, args, plot):
    uniform = {b: {l.name: b for l in layers} for b in BITS}
    budget = size_kb(layers, uniform[4])
    h, took = run_hawq(ir0, m, f"budget_kb={budget:.6f}")
    print(f"  hawq: {took:.1f} s; traces: " + ", ".join(
        f"{k} {v['trace']:.3g}+-{v['std_error']:.1g} ({v['samples']})" for k, v in h["layers"].items()), flush=True)
    rows = [("configuration", "weights KiB", m["metric"], "bits per layer")]
    results = {}
    for b in BITS:
        if str(b) in args.skip_uniform.split(";"):
            continue
        s = m["score"](convert_with(ir0, m, uniform[b]))
        results[f"uniform {b}-bit"] = (size_kb(layers, uniform[b]), s)
        add(rows, (f"uniform {b}-bit", f"{size_kb(layers, uniform[b]):.2f}", fmt_score(s), f"all {b}"))
    s = m["score"](convert_with(ir0, m, h["bits"]))
    add(rows, ("HAWQ (size of uniform 4-bit)", f"{h['size_kb']:.2f}", fmt_score(s), _mix(h["bits"])))
    results["hawq"] = (h["size_kb"], s)
    rand = []
    for seed in range(args.random):
        bits = random_allocation(layers, budget, seed)
        if bits is None:
            add(rows, (f"random allocation (seed {seed})", "-", "-", "no mixed assignment within 85-100% of the size"))
            continue
        s = m["score"](convert_with(ir0, m, bits))
        rand.append((size_kb(layers, bits), s))
        add(rows, (f"random allocation (seed {seed})", f"{size_kb(layers, bits):.2f}", fmt_score(s), _mix(bits)))
    front = []
    for p in spread(h["frontier"], args.frontier_evals):
        front.append((size_kb(layers, p["bits"]), m["score"](convert_with(ir0, m, p["bits"]))))
        add(rows, ("HAWQ frontier point", f"{front[-1][0]:.2f}", fmt_score(front[-1][1]), _mix(p["bits"])))
    plot["size"] = {"uniform": [results[k] for k in results if k.startswith("uniform")], "hawq": front, "random": rand,
                    "chosen": results["hawq"]}
    return rows


def _mix(bits: dict) -> str:
    counts = {b: list(bits.values()).count(b) for b in BITS}
    return ", ".join(f"{n}x{b}" for b, n in counts.items() if n)


# ---------------------------------------------------------------- latency


def measure_model(ir, m, target: str) -> float:
    """Host: min of up to 200 runs (at most ~10 s of them) at batch 1 (ms); arm: instructions
    executed in the kernels."""
    x = m["example"]
    if target == "host":
        from qcompiler.backends.targets import get_backend

        backend = get_backend("host")
        run = backend.runner(backend.build(copy_ir(ir), (x,), "host"))
        t = time.perf_counter()
        run(x)
        first = time.perf_counter() - t
        best = first
        for _ in range(max(3, min(200, int(10 / max(first, 1e-6))))):
            t = time.perf_counter()
            run(x)
            best = min(best, time.perf_counter() - t)
        return best * 1e3
    from qcompiler.backends import arm, layer_costs

    return float(layer_costs.kernel_instructions(arm.build(copy_ir(ir), (x,), "arm"), (x,)))


def latency_rows(m, ir0, layers, target, plot, args):
    unit = "ms" if target == "host" else "instructions"
    t = time.time()
    costs = {b: hawq_cost.latency_table(layers, (b,), 8, 0, target,
                                        lambda i, n, key, v: print(f"    measured {target} {key}: {v:.4g}", flush=True))[0]
             for b in BITS}
    print(f"  {target} cost table: {time.time() - t:.0f} s", flush=True)
    predicted = lambda bits: sum(costs[bits[l.name]][i][0] for i, l in enumerate(layers))  # noqa: E731
    uniform = {b: {l.name: b for l in layers} for b in BITS}
    budget = predicted(uniform[4])
    h, took = run_hawq(ir0, m, f"budget_latency={budget:.6g},target={target}")
    rows = [("configuration", f"predicted {unit}", f"measured {unit}", "weights KiB", m["metric"], "bits per layer")]
    pts = []
    for name, bits in [(f"uniform {b}-bit", uniform[b]) for b in BITS] + [("HAWQ (latency of uniform 4-bit)", h["bits"])]:
        ir = convert_with(ir0, m, bits)
        s = m["score"](ir)
        meas = measure_model(ir, m, target)
        add(rows, (name, f"{predicted(bits):.4g}", f"{meas:.4g}", f"{size_kb(layers, bits):.2f}", fmt_score(s), _mix(bits)))
        pts.append((name, predicted(bits), s))
    front = [(p["cost"], m["score"](convert_with(ir0, m, p["bits"]))) for p in spread(h["frontier"], args.frontier_evals)]
    plot[f"latency {target}"] = {"unit": unit, "uniform": [(c, s) for n, c, s in pts[:3]], "hawq": front,
                                 "chosen": (pts[3][1], pts[3][2])}
    return rows


# ---------------------------------------------------------------- plot


def draw(plots: dict, key_of: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, kind, d) for model, p in plots.items() for kind, d in p.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, kind, d) in zip(axes[0], panels):
        key = key_of[model]
        ux, uy = zip(*[(c, s[key]) for c, s in d["uniform"]])
        ax.plot(ux, uy, "s--", color="tab:gray", label="uniform 2/4/8-bit")
        if d["hawq"]:
            hx, hy = zip(*sorted((c, s[key]) for c, s in d["hawq"]))
            ax.plot(hx, hy, "o-", color="tab:blue", label="HAWQ frontier")
        ax.plot([d["chosen"][0]], [d["chosen"][1][key]], "*", ms=14, color="tab:red", label="HAWQ at uniform 4-bit's cost")
        if d.get("random"):
            rx, ry = zip(*[(c, s[key]) for c, s in d["random"]])
            ax.plot(rx, ry, "x", color="tab:orange", label="random allocation")
        ax.set_xlabel("weights KiB" if kind == "size" else f"{kind.split()[1]} latency ({d['unit']}, per-layer sum)")
        ax.set_ylabel(key)
        ax.set_title(f"{model}: {key} vs {'size' if kind == 'size' else kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,effnet")
    p.add_argument("--latency", default="host,arm", help="targets for the latency budget (CNN), '' for none")
    p.add_argument("--effnet-latency", action="store_true", help="also measure EfficientNet-Lite0's ~150 (layer, bits) costs per target")
    p.add_argument("--random", type=int, default=3, help="random allocations at the same size")
    p.add_argument("--frontier-evals", type=int, default=8, help="frontier points evaluated for the plot (evenly spread)")
    p.add_argument("--samples", type=int, default=0, help="hawq max_samples (default: 100 CNN, 4 EfficientNet)")
    p.add_argument("--hawq", default="", help="more hawq options (EfficientNet default: batches=1,min_samples=3)")
    p.add_argument("--skip-uniform", default="", help="uniform widths not to evaluate in the size table, e.g. 2;8")
    p.add_argument("--skip-size", action="store_true", help="only the latency tables")
    p.add_argument("--png", default="mixed_pareto.png")
    p.add_argument("--smollm2", action="store_true", help="also run benchmarks/mixed_tokens.py (per-token bits)")
    mixed_tokens.add_args(p)  # its options (--windows, --keep, --rotate, ...) for --smollm2
    args = p.parse_args(argv)
    torch.manual_seed(0)
    plots, keys = {}, {}
    for name in filter(None, args.models.split(",")):
        m = {"cnn": cnn, "effnet": effnet}[name]()
        m["samples"], m["hawq"] = args.samples or m["samples"], args.hawq or m.get("hawq", "")
        print(f"\n## {m['name']} ({m['metric']})", flush=True)
        ir0 = folded(m)
        layers = hawq_cost.find_layers(ir0)
        plot, keys[m["name"]] = {}, m["key"]
        if not args.skip_size:
            print(table(size_rows(m, ir0, layers, args, plot)), flush=True)
        targets = [t for t in args.latency.split(",") if t] if (name == "cnn" or args.effnet_latency) else []
        for target in targets:
            print(f"\n### {m['name']}, latency budget on {target}", flush=True)
            print(table(latency_rows(m, ir0, layers, target, plot, args)), flush=True)
        plots[m["name"]] = plot
    if plots and args.png:
        draw(plots, keys, args.png)
    # ---- per-token bits (issue 9, part 2): benchmarks/mixed_tokens.py, owned by the token-bits pass
    if args.smollm2:
        mixed_tokens.main_tokens(args)  # needs the `models` extra and SmolLM2


if __name__ == "__main__":
    main()
