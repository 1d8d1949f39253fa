"""Cortex-M deployment figures per model and bit recipe: flash, peak SRAM, executed instructions
(SMLAD kernels vs the plain C build of the same program), accuracy.

    python benchmarks/mcu.py                       digits CNN + Fashion-MNIST CNN on cortex-m4
    python benchmarks/mcu.py --target cortex-m7    the same on mps2-an500
    python benchmarks/mcu.py --effnet              adds EfficientNet-Lite0 (slow: minutes)
    python benchmarks/mcu.py --only-effnet --check 1 --no-plain --limits flash=16M --recipes w8a8,w4a8,w8a8:patches=2
    python benchmarks/mcu.py --flash --effnet --effnet-size 160 --recipes w8a8,w4a8,w8a8:patches=2
                                                   flash make-up and arena plan only (no board run)

Flash and peak SRAM come from the linked bare firmware (arm-none-eabi-size, -fstack-usage) and
the arena plan; "arena unplanned" is every buffer and the largest workspace side by side.
Instructions are the kernels' (`__tvm_ffi_*` symbols and out-of-line `qc_dot_*` micro-kernel parts) for one inference, counted by the QEMU
plugin; "plain" is the same scheduled program with `dsp=0` (no SMLAD micro-kernel). Accuracy
is measured with `art.ir` (the bit-exact reference) over the test set, and the device's outputs
are compared with it on `--check` samples ("exact" counts those equal bit for bit; the first
sample's check is the counted run). `--limits flash=..,sram=..` adds part limits to every
recipe's target; `--no-plain` skips the dsp=0 build (EfficientNet-Lite0: it doubles the time).
`--flash` builds only the measured firmware (bare.elf, linked in unbounded regions, so a model
over the board's 4 MiB is measured too) and splits its flash by symbol (`arm-none-eabi-nm`):
weights (1-byte constants: int8 and packed 4/2-bit), metadata (biases, requantizer multipliers
and shifts, group scales), kernels, executor (call table, argument table, DLTensors), runtime
shim, libc + startup, and the rest (string literals, alignment); with patches it gives the
arena plan before and after the split. The W4A8 / W8A8 flash ratio is printed per model.
Datasets: scikit-learn digits; Fashion-MNIST from the Debian package dataset-fashion-mnist;
EfficientNet-Lite0 (pip extra `models`) is scored as top-1 agreement with the float model on
the photos of `benchmarks/realdata.sample_images`, at --effnet-size pixels (default 224).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcompiler as qc  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.backends import cortex_m  # noqa: E402
from qcompiler.ir import as_tuple  # noqa: E402


def digits():
    x, y, xt, yt = zoo.digits()
    torch.manual_seed(0)
    return zoo.train_classifier(zoo.DigitsCNN(), x, y), x, xt, yt, "top-1"


def fashion():
    from benchmarks.qat import fashion_mnist, float_model

    x, y, xt, yt = fashion_mnist()
    model, _ = float_model(x, y)
    return model, x, xt, yt, "top-1"


def effnet(size: int):
    from benchmarks import realdata

    model = realdata.load_efficientnet_lite0()
    imgs = realdata.sample_images(crops=4, size=size)
    calib = realdata.sample_images(crops=2, size=size, seed=1)  # other crops, as benchmarks/accuracy.py
    with torch.no_grad():
        labels = torch.cat([model(b) for b in imgs.split(8)]).argmax(-1)
    return model, calib, imgs, labels, "agreement"


def accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return sum(int((fn(x[i:i + 1]).argmax(-1) == y[i]).sum()) for i in range(len(x))) / len(x)


def row(name, model, x_calib, x_test, y_test, metric, recipe, target, check, plain=True, timeout=3600.0) -> list[str]:
    """One table row; a recipe "w8a8:patches=2" adds target options."""
    recipe, _, options = recipe.partition(":")
    target = f"{target},{options}" if options and ":" in target else f"{target}:{options}" if options else target
    calib = [x_calib[i:i + 8] for i in range(0, min(len(x_calib), 64), 8)]
    t0 = time.time()
    try:
        art = qc.compile(model, x_calib[:1], target=target, quant=recipe, calib=calib)
    except qc.MemoryLimitError as e:
        need = str(e).split("needs ")[1].split(" bytes")[0] if "needs " in str(e) else "?"
        print(f"{name} {recipe} {target}: {e}", flush=True)
        return [name, recipe, target, f"does not fit ({need} B)", *["-"] * 11]
    except qc.QCompilerError as e:
        print(f"{name} {recipe} {target}: {type(e).__name__}: {e}", flush=True)
        return [name, recipe, target, f"failed: {type(e).__name__}", *["-"] * 11]
    seconds = time.time() - t0
    m = art.report().memory
    print(f"{name} {recipe} {target}: built in {seconds:.0f} s, flash {m['flash_bytes']} B, "
          f"peak SRAM {m['peak_sram_bytes']} B, arena {m['arena_bytes']} B; flash by region "
          f"{m.get('flash_regions', {})}", flush=True)
    t1 = time.time()
    counts, first = counted_run(art.library, x_test[:1], timeout)
    board_s = time.time() - t1
    ref = as_tuple(art.ir(x_test[:1]))
    exact = int(all(torch.equal(a, b) for a, b in zip(first, ref)))
    if not exact:
        print(f"  board vs IR: largest difference {max(float((a - b).abs().max()) for a, b in zip(first, ref)):.3g}")
    exact += sum(torch.equal(art(x_test[i:i + 1]), art.ir(x_test[i:i + 1])) for i in range(1, check))
    dsp = cortex_m.kernel_instructions(counts)
    print(f"{name} {recipe} {target}: board run {board_s:.0f} s, {counts.total} instructions "
          f"({dsp.insns} in kernels), exact vs art.ir: {exact}/{check}", flush=True)
    if plain:
        p = cortex_m.build_program(art.library.extracted, f"{target.split(':')[0]}:dsp=0")
        base = cortex_m.kernel_instructions(counted_run(p, x_test[:1], timeout)[0])
    acc = accuracy(art.ir, x_test, y_test)
    return [name, recipe, target, f"{m['flash_bytes'] / 1024:.1f}", f"{m['peak_sram_bytes'] / 1024:.1f}",
            f"{m['arena_bytes'] / 1024:.1f}", f"{m['unplanned_bytes'] / 1024:.1f}", f"{dsp.insns / 1e6:.3f}",
            f"{base.insns / 1e6:.3f}" if plain else "-", f"{base.insns / max(dsp.insns, 1):.2f}x" if plain else "-",
            str(dsp.classes["smlad"]), f"{metric} {acc:.4f}, exact {exact}/{check}", f"{seconds:.0f}",
            f"{m['patches']['arena_bytes_unsplit'] / 1024:.1f} -> {m['arena_bytes'] / 1024:.1f}" if "patches" in m else "-",
            f"{board_s:.0f}"]


def quantized_ir(model, x_calib, recipe: str, target: str):
    """The integer IR `qc.compile` would build (same pipeline, calibration and target)."""
    from qcompiler.ir import copy_ir

    ir = copy_ir(qc.trace(model, (x_calib[:1],)))
    ctx = qc.PassContext()
    ctx.target, ctx.calib = target, [x_calib[i:i + 8] for i in range(0, min(len(x_calib), 64), 8)]
    qc.PassManager.parse(qc.QuantSpec.parse(recipe).pipeline()).run(ir, ctx)
    return ir


def flash_parts(work: str, program) -> dict:
    """bare.elf's flash (text + data) by kind of symbol; "other" is what no symbol covers."""
    import re
    import subprocess

    m = cortex_m.measure(work)
    nm = subprocess.run(["arm-none-eabi-nm", "-S", "--defined-only", "bare.elf"], cwd=work, capture_output=True,
                        text=True, check=True).stdout
    parts = dict.fromkeys(["weights", "metadata", "kernels", "executor", "shim", "libc+startup"], 0)
    for line in nm.splitlines():
        f = line.split()
        if len(f) != 4 or f[2] in "bBdD":  # RAM (.bss; .data counted in text+data only via its image)
            continue
        size, name = int(f[1], 16), f[3]
        if m_ := re.fullmatch(r"qc_c(\d+)", name):
            parts["weights" if program.constants[int(m_.group(1))].itemsize == 1 else "metadata"] += size
        elif name.startswith("__tvm_ffi_"):
            parts["kernels"] += size
        elif name in ("qc_model_run", "args", "calls") or re.fullmatch(r"(t|shape)\d+", name):
            parts["executor"] += size
        elif name.startswith(("qc_", "TVM")):
            parts["shim"] += size
        else:
            parts["libc+startup"] += size
    parts["flash"] = m["text"] + m["data"]
    parts["other"] = parts["flash"] - sum(v for k, v in parts.items() if k != "flash")
    return parts


def flash_row(name, model, x_calib, recipe, target) -> tuple[list[str], int]:
    """Flash make-up of bare.elf and the arena plan (before/after patches), without a board run."""
    import tempfile

    from qcompiler.backends.mcu_dsp import header
    from qcompiler.backends.mcu_patches import split_patches
    from qcompiler.backends.mcu_plan import plan
    from qcompiler.backends.mcu_project import project_files
    from qcompiler.backends.program import extract

    recipe, _, options = recipe.partition(":")
    target = f"{target},{options}" if options and ":" in target else f"{target}:{options}" if options else target
    opts = cortex_m.options(target)
    t0 = time.time()
    ir = quantized_ir(model, x_calib, recipe, opts["base"])
    x = (x_calib[:1],)
    unsplit = note = ""
    if opts["patches"]:
        before = plan(cortex_m.kernels_source(extract(ir, x, opts["base"]), opts["base"], False, c=False)[0])
        unsplit = f"{before.arena_bytes / 1024:.1f}"
        ir, note = split_patches(ir, opts["patches"])
        print(f"{name} {recipe} {target}: {note}", flush=True)
    program, src, _ = cortex_m.kernels_source(extract(ir, x, opts["base"]), opts["base"], opts["dsp"])
    arena = plan(program)
    with tempfile.TemporaryDirectory(prefix="qc-mcu-flash-") as work:
        cortex_m.write_files(project_files(program, arena, src, header(), opts["base"], cortex_m.headers_dirs()),
                             work)
        import subprocess

        subprocess.run(["make", "-s", "bare.elf"], cwd=work, check=True)
        parts = flash_parts(work, program)
    fits = "yes" if parts["flash"] <= opts["flash"] else f"no (> {opts['flash'] >> 10} KiB)"
    kib = [f"{parts[k] / 1024:.1f}" for k in ("flash", "weights", "metadata", "kernels", "executor", "shim",
                                                "libc+startup", "other")]
    return [name, recipe, target, *kib, fits, f"{arena.arena_bytes / 1024:.1f}",
            f"{unsplit} -> {arena.arena_bytes / 1024:.1f}" if unsplit else "-",
            f"{time.time() - t0:.0f}"], parts["flash"]


def flash_table(models, args) -> None:
    head = ["model", "recipe", "target", "flash KiB", "weights", "metadata", "kernels", "executor", "shim",
            "libc+startup", "other", "fits board", "arena KiB", "patches: arena unsplit -> split", "s"]
    rows, ratios = [head], []
    for name, load in models:
        model, x_calib, _, _, _ = load()
        flash = {}
        for recipe in args.recipes.split(","):
            target = f"{args.target}:{args.limits}" if args.limits else args.target
            r, flash[recipe] = flash_row(name, model.eval(), x_calib, recipe, target)
            rows.append(r)
            print("  ".join(r), flush=True)
        if "w4a8" in flash and "w8a8" in flash:
            ratios.append(f"{name}: W4A8 / W8A8 flash = {flash['w4a8']} / {flash['w8a8']} = "
                          f"{flash['w4a8'] / flash['w8a8']:.3f}")
    print_table(rows)
    print("\n".join(ratios))


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def counted_run(binary, x, timeout: float):
    """One run on the emulated board under the counting plugin: (instruction counts, outputs);
    `cortex_m.instruction_counts` with a timeout that fits a large model."""
    from qcompiler.backends.arm import decode_outputs
    from qcompiler.backends.icount import Counter

    with Counter(qemu="qemu-system-arm") as counter:
        data = cortex_m.execute(binary, (x,), counter.qemu_args, timeout=timeout)[1]
        return counter.read(), decode_outputs(binary.signature, data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="cortex-m4", choices=["cortex-m4", "cortex-m7"])
    p.add_argument("--recipes", default="w8a8,w4a8,w8a8:patches=2")
    p.add_argument("--check", type=int, default=4, help="test samples run on the emulated board")
    p.add_argument("--effnet", action="store_true", help="add EfficientNet-Lite0")
    p.add_argument("--effnet-size", type=int, default=224)
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--only-effnet", action="store_true")
    p.add_argument("--limits", default="", help="part limits added to every target, e.g. flash=16M,sram=8M")
    p.add_argument("--no-plain", action="store_true", help="skip the plain C (dsp=0) build and its count")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one board run may take")
    p.add_argument("--flash", action="store_true", help="flash make-up and arena plan only (no board run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = [("digits CNN", digits)]
    if not args.skip_fashion:
        models.append(("Fashion-MNIST CNN", fashion))
    if args.effnet:
        models.append((f"EfficientNet-Lite0 {args.effnet_size}px", lambda: effnet(args.effnet_size)))
    if args.only_effnet:
        models = models[-1:]
    if args.flash:
        return flash_table(models, args)
    head = ["model", "recipe", "target", "flash KiB", "peak SRAM KiB", "arena KiB", "arena unplanned KiB",
            "kernel M insns (SMLAD)", "plain M insns", "ratio", "SMLAD", "accuracy (IR; device exact)", "compile s",
            "patches: arena KiB unsplit -> split", "board run s"]
    rows = [head]
    for name, load in models:
        model, x_calib, x_test, y_test, metric = load()
        for recipe in args.recipes.split(","):
            target = f"{args.target}:{args.limits}" if args.limits else args.target
            rows.append(row(name, model.eval(), x_calib, x_test, y_test, metric, recipe, target, args.check,
                            not args.no_plain, args.timeout))
            print("  ".join(rows[-1]), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
