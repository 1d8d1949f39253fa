"""Peer quantizers for `accuracy.py`, at the same bits as the project's recipes where they
have them: torchao (SmolLM2) and onnxruntime (MiniLM dynamic int8, EfficientNet static QDQ)."""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import torch


def torchao_llm(model, bits: str, evaluate) -> dict:
    """torchao on the block linears (lm_head excluded): int8 dynamic (W8A8) and 8da4w with
    group 64 (W4A8: 576 is not a multiple of 128); torchao has no 4-bit activations."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig, Int8DynamicActivationIntxWeightConfig, quantize_)
    from torchao.quantization.granularity import PerGroup

    configs = {
        "W8A8": (Int8DynamicActivationInt8WeightConfig, {}, "int8 dynamic per token, int8 per channel"),
        "W4A8": (Int8DynamicActivationIntxWeightConfig, {"weight_dtype": torch.int4, "weight_granularity": PerGroup(64)},
                 "8da4w, group 64"),
    }
    if bits not in configs:
        return {"error": "n/a: torchao has no 4-bit activation quantization"}
    cls, kw, what = configs[bits]
    m = copy.deepcopy(model)
    quantize_(m, cls(**kw), filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
    return {"ppl": evaluate(m), "config": what}


def _export(model, example: tuple, names: list[str], path: str) -> None:
    dyn = {n: {0: "batch"} for n in names}
    torch.onnx.export(model, example, path, input_names=names, output_names=["out"],
                      dynamic_axes={**dyn, "out": {0: "batch"}}, opset_version=17, dynamo=False)


def ort_dynamic(model, example: tuple, score) -> dict:
    """onnxruntime quantize_dynamic: int8 weights per channel, activations uint8 per tensor at run time."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tempfile.mkdtemp()
    f, q = os.path.join(d, "m.onnx"), os.path.join(d, "q.onnx")
    _export(model, example, ["ids", "mask"], f)
    quantize_dynamic(f, q, per_channel=True, weight_type=QuantType.QInt8)
    sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        return torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])

    return {**score(run), "config": "quantize_dynamic per_channel QInt8"}


def ort_static(model, example, calib: list, score) -> dict:
    """onnxruntime quantize_static, QDQ, int8 weights per channel, uint8 activations (minmax)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    d = tempfile.mkdtemp()
    f, q = os.path.join(d, "m.onnx"), os.path.join(d, "q.onnx")
    _export(model, (example,), ["x"], f)
    quantize_static(f, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
    return {**score(lambda x: torch.from_numpy(sess.run(None, {"x": np.ascontiguousarray(x.numpy())})[0])),
            "config": "quantize_static QDQ per_channel QInt8/QUInt8"}
