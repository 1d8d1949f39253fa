"""QAT checkpoints: safetensors for the tensors, JSON for the rest, written atomically.

A checkpoint directory holds `qat-step<N>.safetensors` (every trained tensor, the optimizer
state, the oscillation state, the adapters) and `qat-checkpoint.json`, the record naming
that file with its sha256, the step, and the model's fingerprint. Each file is written to a
temporary name, flushed and moved into place (`os.replace`), tensors first: an interrupted
write leaves the previous checkpoint intact. Older tensor files are removed after the record
points to the new one. No pickle.

The fingerprint hashes the IR's structure (every node's op and name, every attribute's shape
and dtype), so a checkpoint of another model is refused with a clear error rather than loaded
into tensors of the wrong meaning.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import torch
import torch.fx
from safetensors.torch import load_file, save_file

from qcompiler.artifact_io import _sha256  # the artifacts' file hash
from qcompiler.errors import TrainingError
from qcompiler.ir import op_name

FORMAT = 1
RECORD = "qat-checkpoint.json"


def fingerprint(gm: torch.fx.GraphModule) -> str:
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        h.update(f"{n.op}|{n.name}|{op_name(n) if n.op == 'call_function' else n.target}\n".encode())
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                h.update(f"{list(obj.shape)}|{obj.dtype}\n".encode())
    return h.hexdigest()[:20]


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"optim/{i}/{k}": (v if isinstance(v, torch.Tensor) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(directory: str, step: int, tensors: dict[str, torch.Tensor], record: dict) -> str:
    """Write the checkpoint of `step`; returns the tensors file's path."""
    os.makedirs(directory, exist_ok=True)
    name = f"qat-step{step:07d}.safetensors"
    path = os.path.join(directory, name)
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, tmp))
    rec = {"format": FORMAT, "step": step, "tensors": name, "sha256": _sha256(path), **record}

    def write_record(tmp):
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)

    _atomic(os.path.join(directory, RECORD), write_record)
    for old in glob.glob(os.path.join(directory, "qat-step*.safetensors")):
        if os.path.basename(old) != name:
            os.remove(old)
    return path


def load(directory: str, expected_fingerprint: str, expected_names: set[str]) -> tuple[int, dict, dict] | None:
    """(step, tensors, record) of the checkpoint in `directory`, None if there is none."""
    rec_path = os.path.join(directory, RECORD)
    if not os.path.exists(rec_path):
        return None
    try:
        with open(rec_path) as f:
            rec = json.load(f)
        step, name = int(rec["step"]), rec["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"checkpoint record {rec_path} is unreadable ({type(e).__name__}: {e}); "
                            "delete it or use another checkpoint_dir") from None
    if rec.get("format") != FORMAT:
        raise TrainingError(f"checkpoint {rec_path} has format {rec.get('format')!r}; this qcompiler reads {FORMAT}")
    if rec.get("fingerprint") != expected_fingerprint:
        raise TrainingError(
            f"checkpoint {rec_path} (step {step}) was written for another model (fingerprint "
            f"{rec.get('fingerprint')}, this IR has {expected_fingerprint}; it was trained with "
            f"`{rec.get('pipeline', '?')}`): resume only with the IR it was written for, or give a new checkpoint_dir")
    path = os.path.join(directory, name)
    if not os.path.exists(path) or _sha256(path) != rec.get("sha256"):
        raise TrainingError(f"checkpoint tensors {path} are missing or do not match the sha256 in {rec_path} "
                            "(an interrupted copy?); delete the directory or use another checkpoint_dir")
    tensors = load_file(path)
    model_names = {k for k in tensors if not k.startswith("optim/")}
    if model_names != expected_names:
        missing, extra = sorted(expected_names - model_names), sorted(model_names - expected_names)
        raise TrainingError(
            f"checkpoint {path} was written with other qat options (`{rec.get('pipeline', '?')}`): "
            f"it lacks {missing[:4]} and has {extra[:4]} beyond what this run trains; resume with the same "
            "quantizers/lora_rank/damp/freeze options or give a new checkpoint_dir")
    return step, tensors, rec
