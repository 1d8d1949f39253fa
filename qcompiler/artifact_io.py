"""Artifact files: a folder (or the same files in a `.qca` zip) holding

    manifest.json        format, target, input shapes, and the sha256 of every other file
    ir.json              the converted IR's graph (see `qcompiler.serialize`)
    weights.safetensors  the IR's tensors
    report.json          the compile report
    lib.so               the compiled library (host), or for arm: model.elf (the static
                         program), driver.c and kernels.o (what it was linked from), program.json

Nothing is pickled. Loading checks every hash, so a truncated or corrupted artifact is
refused with the file at fault named, never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile

from safetensors.torch import load_file, save_file

from .errors import ArtifactError
from .report import Report
from .serialize import ir_from_json, ir_to_json

FORMAT = 1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_folder(art, folder: str) -> None:
    from .backends.targets import get_backend

    os.makedirs(folder, exist_ok=True)
    graph, tensors = ir_to_json(art.ir)
    with open(os.path.join(folder, "ir.json"), "w") as f:
        json.dump(graph, f)
    save_file(tensors, os.path.join(folder, "weights.safetensors"))
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(art.report().to_json(), f, indent=1)
    libs = get_backend(art.target).save(art.library, folder)
    files = {n: _sha256(os.path.join(folder, n)) for n in ("ir.json", "weights.safetensors", "report.json", *libs)}
    manifest = {"format": FORMAT, "target": art.target, "inputs": art.inputs,
                "single_output": art.single_output, "files": files}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def save(art, path: str) -> None:
    """Write atomically: into a temporary sibling first, then rename over `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise ArtifactError(f"cannot save to {path}: it exists and is neither a file nor a folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".qca-", dir=parent)
    try:
        _write_folder(art, tmp)
        if path.endswith(".qca"):
            zpath = tmp + ".zip"
            with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:
                for name in sorted(os.listdir(tmp)):
                    z.write(os.path.join(tmp, name), name)
            os.replace(zpath, path)
        else:
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str, artifact_cls):
    from .backends.targets import get_backend

    if not os.path.exists(path):
        raise ArtifactError(f"artifact {path!r} does not exist")
    holder = None
    folder = path
    if not os.path.isdir(path):
        if not zipfile.is_zipfile(path):
            raise ArtifactError(f"{path} is not a qcompiler artifact: not a folder or a .qca (zip) file; "
                                "it may be truncated, or written by something else")
        holder = tempfile.TemporaryDirectory(prefix="qca-")
        try:
            with zipfile.ZipFile(path) as z:
                z.extractall(holder.name)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ArtifactError(f"{path} is corrupt: {e}") from e
        folder = holder.name
    manifest = _read_json(folder, "manifest.json", path)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r} is not supported (expected {FORMAT})")
    for name, digest in manifest.get("files", {}).items():
        full = os.path.join(folder, name)
        if not os.path.exists(full):
            raise ArtifactError(f"{path}: {name} is missing; the artifact is incomplete, compile it again")
        if _sha256(full) != digest:
            raise ArtifactError(f"{path}: {name} does not match its recorded hash; the artifact is corrupt "
                                "or was edited, compile it again")
    try:
        tensors = load_file(os.path.join(folder, "weights.safetensors"))
    except Exception as e:
        raise ArtifactError(f"{path}: weights.safetensors is unreadable: {e}") from e
    ir = ir_from_json(_read_json(folder, "ir.json", path), tensors)
    if manifest["single_output"]:
        out = next(n for n in ir.graph.nodes if n.op == "output")
        if isinstance(out.args[0], (list, tuple)) and len(out.args[0]) == 1:
            out.args = (out.args[0][0],)
            ir.recompile()
    report = Report.from_json(_read_json(folder, "report.json", path))
    library = get_backend(manifest["target"]).load(folder)
    art = artifact_cls(ir, library, manifest["target"], manifest["inputs"], manifest["single_output"], report)
    art._tempdir = holder  # keeps extracted files alive as long as the artifact
    return art


def _read_json(folder: str, name: str, path: str) -> dict:
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {name} is missing; the artifact is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: {name} is not valid JSON ({e}); the artifact is corrupt") from e
