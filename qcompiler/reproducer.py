"""Crash reproducers: when a pass fails (with `PassContext(reproducer_dir=...)`), the IR it
received, the rest of the pipeline and a few calibration batches are written to a folder;
`qcompiler opt --replay DIR` (or `replay(DIR)`) runs them again.

    DIR/ir.json, DIR/weights.safetensors   the input IR (see qcompiler.serialize)
    DIR/inputs.safetensors                 example inputs and up to 4 calibration batches
    DIR/pipeline.txt                       the failing pass and the ones after it
    DIR/error.txt                          the error, for the bug report
"""

from __future__ import annotations

import json
import os
import traceback

from safetensors.torch import load_file, save_file

from .context import PassContext
from .errors import ArtifactError
from .ir import as_tuple
from .serialize import ir_from_json, ir_to_json

MAX_BATCHES = 4


def write_reproducer(folder: str, gm, pipeline: str, ctx, exc: BaseException) -> None:
    os.makedirs(folder, exist_ok=True)
    graph, tensors = ir_to_json(gm)
    with open(os.path.join(folder, "ir.json"), "w") as f:
        json.dump({**graph, "dynamic_batch": gm.meta["qc"].get("dynamic_batch", True)}, f)
    save_file(tensors, os.path.join(folder, "weights.safetensors"))
    inputs = {f"example_{i}": t.contiguous() for i, t in enumerate(gm.meta["qc"]["example_inputs"])}
    for b, batch in enumerate(list(ctx.calib or [])[:MAX_BATCHES]):
        for i, t in enumerate(as_tuple(batch)):
            inputs[f"calib_{b}_{i}"] = t.contiguous()
    save_file(inputs, os.path.join(folder, "inputs.safetensors"))
    with open(os.path.join(folder, "pipeline.txt"), "w") as f:
        f.write(pipeline + "\n")
    with open(os.path.join(folder, "error.txt"), "w") as f:
        f.write("".join(traceback.format_exception(exc)))


def load_reproducer(folder: str):
    """(ir, pipeline text, PassContext with the saved calibration batches)."""
    try:
        with open(os.path.join(folder, "ir.json")) as f:
            graph = json.load(f)
        with open(os.path.join(folder, "pipeline.txt")) as f:
            pipeline = f.read().strip()
        tensors = load_file(os.path.join(folder, "weights.safetensors"))
        inputs = load_file(os.path.join(folder, "inputs.safetensors"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{folder} is not a complete reproducer folder: {e}") from e
    gm = ir_from_json(graph, tensors)
    examples = tuple(inputs[k] for k in sorted(k for k in inputs if k.startswith("example_")))
    gm.meta["qc"] = {"example_inputs": examples, "dynamic_batch": graph.get("dynamic_batch", True)}
    batches = []
    for b in range(MAX_BATCHES):
        batch = tuple(inputs[f"calib_{b}_{i}"] for i in range(len(examples)) if f"calib_{b}_{i}" in inputs)
        if batch:
            batches.append(batch)
    return gm, pipeline, PassContext(calib=batches or None)
