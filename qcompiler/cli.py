"""The `qcompiler` command line.

    qcompiler compile m.pt2 --target host --quant w8a8 -o out/ [--calib calib.npy] [--tune-trials 64]
    qcompiler opt m.pt2 -p "fake-quant(w=8,a=8),calibrate,convert" --print-ir-after-all
    qcompiler opt --replay repro/
    qcompiler run out/ --input x.npy [--output y.npy]
    qcompiler passes

Models are torch.export files (`torch.export.save`); calibration data is a .npy array (one
input; split into batches along dim 0) or a .npz with one array per input, in order.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from . import api
from .context import PassContext
from .errors import QCompilerError
from .frontends.pytorch import trace
from .ir import print_ir


def _calib(path: str | None, batch: int):
    if path is None:
        return None
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise QCompilerError(f"cannot read calibration data {path}: {e}") from e
    arrays = [data] if isinstance(data, np.ndarray) else [data[k] for k in data.files]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    n = tensors[0].shape[0]
    return [tuple(t[i:i + batch] for t in tensors) for i in range(0, n, batch)]


def _context(args) -> PassContext:
    mode = "all" if args.print_ir_after_all else ("change" if args.print_ir_after_change else None)
    return PassContext(calib=_calib(args.calib, args.calib_batch), print_ir_after=mode,
                       dump_dir=args.dump_dir, reproducer_dir=args.reproducer_dir)


def _tune(args):
    """--tune-trials N [--tune-db DIR] [--rpc-tracker HOST:PORT --rpc-key KEY] -> qc.Tune."""
    from .backends.tuning import RPC, Tune

    if args.tune_trials is None:
        if args.tune_db or args.rpc_tracker or args.rpc_key:
            raise QCompilerError("--tune-db, --rpc-tracker and --rpc-key need --tune-trials N")
        return None
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise QCompilerError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
    rpc = RPC(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
    return Tune(trials=args.tune_trials, database=args.tune_db, rpc=rpc)


def cmd_compile(args):
    art = api.compile(args.model, target=args.target, quant=args.quant, pipeline=args.pipeline,
                      ctx=_context(args), dynamic_batch=args.dynamic_batch, tune=_tune(args))
    art.save(args.output)
    print(art.report())
    print(f"wrote {args.output}")


def cmd_opt(args):
    from .pass_manager import PassManager
    from .reproducer import load_reproducer

    if args.replay:
        gm, text, ctx = load_reproducer(args.replay)
        saved = _context(args)
        ctx.print_ir_after, ctx.dump_dir = saved.print_ir_after, saved.dump_dir
        text = args.pipeline or text
    else:
        if not args.model or not args.pipeline:
            raise QCompilerError("qcompiler opt needs a model file and -p PIPELINE (or --replay DIR)")
        pm = PassManager.parse(args.pipeline)  # bad pipeline text fails before tracing
        model, examples = api.load_model_file(args.model)
        gm, text, ctx = trace(model, examples), args.pipeline, _context(args)
    gm = PassManager.parse(text).run(gm, ctx)
    if not ctx.print_ir_after:
        sys.stdout.write(print_ir(gm))
    for name, seconds in ctx.timings:
        print(f"// {name}: {seconds * 1000:.1f} ms", file=sys.stderr)


def cmd_run(args):
    art = api.load(args.artifact)
    inputs = [torch.from_numpy(np.load(p)) for p in args.input]
    out = art(*inputs)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    if args.output:
        np.save(args.output, outs[0].numpy())
        print(f"wrote {args.output}")
    else:
        for o in outs:
            print(o.numpy())


def cmd_passes(args):
    import dataclasses
    import typing

    from .pass_manager import registered_passes

    for name, cls in sorted(registered_passes().items()):
        hints = typing.get_type_hints(cls)
        opts = ", ".join(f"{f.name}={f.default!r} ({getattr(hints[f.name], '__name__', hints[f.name])})"
                         for f in dataclasses.fields(cls))
        print(f"{name}: {' '.join((cls.__doc__ or '').split())}\n    options: {opts or 'none'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompiler", description="quantization compiler for edge devices")
    sub = p.add_subparsers(dest="command", required=True)

    def data_opts(s):
        s.add_argument("--calib", help="calibration data: .npy (one input) or .npz (one array per input)")
        s.add_argument("--calib-batch", type=int, default=32, help="calibration batch size (default 32)")
        s.add_argument("--print-ir-after-all", action="store_true")
        s.add_argument("--print-ir-after-change", action="store_true")
        s.add_argument("--dump-dir", help="write numbered IR files after each pass here")
        s.add_argument("--reproducer-dir", help="on a pass failure, write a replayable reproducer here")

    c = sub.add_parser("compile", help="quantize and compile a torch.export file")
    c.add_argument("model")
    c.add_argument("--target", default="host")
    c.add_argument("--quant", default="w8a8", help="recipe: w8a8, w4a8, w4a8g64, ...")
    c.add_argument("-p", "--pipeline", help="pass pipeline text (overrides --quant)")
    c.add_argument("-o", "--output", required=True, help="artifact folder, or a file ending in .qca")
    c.add_argument("--dynamic-batch", action="store_true", help="code for any batch size (default: the example's)")
    c.add_argument("--tune-trials", type=int, help="MetaSchedule-tune the kernels with this many measurements")
    c.add_argument("--tune-db", help="tuning database folder (default: the user cache, per target)")
    c.add_argument("--rpc-tracker", help="measure on devices of this TVM RPC tracker (HOST:PORT)")
    c.add_argument("--rpc-key", help="device key of the RPC servers registered with the tracker")
    data_opts(c)
    c.set_defaults(fn=cmd_compile)

    o = sub.add_parser("opt", help="run a pass pipeline and print the IR")
    o.add_argument("model", nargs="?")
    o.add_argument("-p", "--pipeline")
    o.add_argument("--replay", help="run a reproducer folder written on a pass failure")
    data_opts(o)
    o.set_defaults(fn=cmd_opt)

    r = sub.add_parser("run", help="run a compiled artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", required=True, help=".npy file, once per model input")
    r.add_argument("--output", help="write the (first) output to this .npy file")
    r.set_defaults(fn=cmd_run)

    ps = sub.add_parser("passes", help="list the passes and their options")
    ps.set_defaults(fn=cmd_passes)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except QCompilerError as e:
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
