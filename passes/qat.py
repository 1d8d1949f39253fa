"""`qat`: quantization-aware training of the fake-quant IR, in place.

The IR after `fake-quant` and `calibrate` is a torch module whose `qc.fake_quant` nodes are
exactly the rounding the integer backends perform; training it with the quantizers in the
loop (straight-through gradients) recovers what rounding loses at low bits, and `convert`
then turns the trained weights and learned scales into integer ops with no gap.

One step on batch (x, y) (see the `qat_*` modules for each piece):

    t, t_feats   = teacher(x)                   float, no gradient, cached per batch (`qat_data`)
    s, s_feats   = student(x [, teacher's values at `intervene` nodes])
    L = task(s, y)                                           loss=task
      | T^2 KL(t || s) + sum feature(s_feats, t_feats)     loss=distill (`qat_losses`)
      | distill + entropy(q, k) + distribution(q, k)        loss=edgeqat (EdgeQAT)
      + attention-map KL(t || s)                           attention_weight > 0
      + damping                                              damp > 0 (`qat_oscillation`)
    Adam step on weights (or low-rank adapters, `qat_lora`) at `lr`, on LSQ/LSQ+ scales and
    offsets at `lr_quant` (`qat_params`) and, with lr_clip > 0, on the clip ratios of the
    run-time (per-token, KV-cache) quantizers at `lr_clip` (`qat_clips`; not with data=noise,
    which keeps every activation range as calibrated), each rate raised linearly over the first
    `warmup` steps (so a large rate does not break a GPTQ start), then cosine-decayed; then
    oscillation tracking/freezing.
    (AdamW's fused kernel by default: one pass over each tensor instead of about ten, the
    same update up to the last bit of rounding; fused_adam=false for torch's loop.)

Data: `PassContext.train`, the calibration batches, or none (`qat_data`). Teacher:
`PassContext.teacher`, else the IR itself with its quantizers bypassed, copied before
training. Teacher Intervention runs the first `intervene_steps` steps (default half) with the
teacher's values fed into the student at the `intervene` nodes (their own values distilled),
then withdraws. Checkpoints every `checkpoint_every` steps (`qat_checkpoint`), resumed
automatically from `checkpoint_dir`; a non-finite loss stops training, naming the step, with
the IR back at its last good state. Under torchrun the steps run data-parallel (`qat_dist`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from qcompiler.errors import QuantSpecError, TrainingError
from qcompiler.ir import example_inputs
from qcompiler.pass_manager import Pass, PassResult, register
from qcompiler.spec import check_bits

from . import qat_checkpoint, qat_dist, qat_lora
from .qat_clips import ClipRatios
from .qat_data import Batches, TeacherCache
from .qat_graph import (attentions, flat_outputs, float_teacher, quantized_qk, require_nodes, snap_biases,
                        teacher_name, view)
from .qat_losses import (CodeGrid, attention_loss, code_grids, distill_output, distribution_loss, entropy_loss,
                         feature_loss, task_loss)
from .qat_oscillation import Oscillation
from .qat_params import QuantParams, fake_quants


@dataclass(frozen=True)
class Taps:
    """The node values the losses read: distilled intermediates, quantized queries/keys (with
    their code grids), attention maps, and the nodes Teacher Intervention feeds."""

    feats: list[str]
    qk: list[str]
    grids: list[CodeGrid]
    maps: list[str]
    intervene: list[str]

    @property
    def teacher(self) -> list[str]:
        """What the teacher returns (by the student's node names)."""
        return self.feats + self.qk + self.maps + self.intervene

    def student(self, phase: str) -> list[str]:
        """What the student view of `phase` ("ti" or "main") returns."""
        grid_names = [name for g in self.grids for name in g.names]
        return self.feats + self.qk + self.maps + (self.intervene if phase == "ti" else []) + grid_names


@register("qat")
class QAT(Pass):
    """Quantization-aware training of the fake-quant IR (LSQ/LSQ+ scales, task, distillation
    or EdgeQAT losses, Teacher Intervention, oscillation damping/freezing, low-rank adapters,
    data-free mode, checkpoints, torchrun); run after calibrate, before convert."""

    steps: int = 200
    lr: float = 1e-4
    lr_quant: float = 1e-3
    lr_clip: float = 0.0
    warmup: int = 0
    loss: Literal["task", "distill", "edgeqat"] = "distill"
    data: Literal["auto", "train", "calib", "synthetic", "noise"] = "auto"
    batch: int = 0
    quantizers: Literal["lsq+", "lsq", "fixed"] = "lsq+"
    train_weights: bool = True
    temperature: float = 1.0
    output_loss: Literal["kl", "mse"] = "kl"
    task_weight: float = 0.0
    distill_nodes: tuple[str, ...] = ()
    feature_weight: float = 1.0
    entropy_weight: float = 0.01
    distribution_weight: float = 0.1
    attention_weight: float = 0.0
    intervene: tuple[str, ...] = ()
    intervene_steps: int = 0
    teacher_cache_mb: int = 2048
    damp: float = 0.0
    freeze: float = 0.0
    osc_bits: int = 4
    lora_rank: int = 0
    lora_alpha: float = 0.0
    clip: float = 1.0
    fused_adam: bool = True
    weight_decay: float = 0.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    resume: bool = True
    distributed: Literal["auto", "off"] = "auto"
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch", "warmup", "intervene_steps", "lora_rank", "checkpoint_every",
                     "teacher_cache_mb"):
            if getattr(self, name) < (1 if name == "steps" else 0):
                raise QuantSpecError(f"{name}={getattr(self, name)} must be {'positive' if name == 'steps' else '>= 0'}")
        if self.warmup >= self.steps:
            raise QuantSpecError(f"warmup={self.warmup} must be fewer than steps={self.steps} (the rates rise over "
                                 "the warm-up steps and decay over the rest)")
        if self.lr <= 0 or self.lr_quant < 0 or self.lr_clip < 0:
            raise QuantSpecError(f"lr={self.lr}, lr_quant={self.lr_quant}, lr_clip={self.lr_clip}: learning rates "
                                 "must be positive (lr_quant and lr_clip may be 0: those quantities stay fixed)")
        check_bits(self.osc_bits, "osc_bits")
        if self.loss == "task" and self.data in ("synthetic", "noise"):
            raise QuantSpecError(f"loss=task needs targets, which data={self.data} does not have: use loss=distill "
                                 "(data-free training distills the float teacher)")
        if self.lora_rank and self.freeze > 0:
            raise QuantSpecError("freeze acts on the weights, which lora_rank>0 keeps fixed: use one or the other")
        if self.attention_weight > 0 and self.loss == "task":
            raise QuantSpecError("attention_weight distills the teacher's attention maps, and loss=task has no "
                                 "teacher: use loss=distill or loss=edgeqat")
        if self.intervene_steps and not self.intervene:
            raise QuantSpecError("intervene_steps needs intervene=node;node (the nodes the teacher feeds)")

    # ------------------------------------------------------------------ set-up
    def run(self, gm, ctx) -> PassResult:
        _check_ir(gm)
        rank, world = qat_dist.world(self.distributed)
        torch.manual_seed(self.seed)
        data = Batches(self.data, ctx, example_inputs(gm), gm.meta["qc"].get("dynamic_batch", True), self.batch, self.seed)
        if (self.loss == "task" or self.task_weight > 0) and not data.has_targets:
            raise TrainingError(f"loss=task (or task_weight>0) needs targets: give PassContext(train=[(inputs..., "
                                f"target), ...]); the {data.mode} data has none. Or use loss=distill.")
        qk_fqs = quantized_qk(gm) if self.loss == "edgeqat" else []
        if self.loss == "edgeqat" and not qk_fqs:
            raise TrainingError("loss=edgeqat needs quantized attention (queries or keys through a fake-quant before "
                                "the matmul that feeds a softmax: fake-quant with ops=matmul, or kv=<bits>), and the IR "
                                "has none; use loss=distill")
        maps = [sm.name for sm, _, _ in attentions(gm)] if self.attention_weight > 0 else []
        if self.attention_weight > 0 and not maps:
            raise TrainingError(f"attention_weight={self.attention_weight} distills attention maps, and the IR has no "
                                "attention (a softmax over a matmul's product); leave attention_weight at 0")
        nodes = {n.name: n for n in gm.graph.nodes}
        taps = Taps(list(self.distill_nodes), [n.name for n in qk_fqs], code_grids(qk_fqs), maps, list(self.intervene))
        require_nodes(nodes, taps.teacher)
        teacher = None
        if self.loss != "task" or self.intervene:
            t_ir = float_teacher(gm) if ctx.teacher is None else _traced_teacher(ctx.teacher, gm)
            teacher = TeacherCache(view(t_ir, [teacher_name(nodes[c]) for c in taps.teacher], what="teacher"),
                                   self.teacher_cache_mb)
        qp = QuantParams(gm, self.quantizers, self.train_weights and not self.lora_rank, learn_acts=data.mode != "noise")
        clips = ClipRatios(gm) if self.lr_clip > 0 and data.mode != "noise" else None
        if clips is not None and not clips.params:
            qp.restore()
            raise TrainingError(f"lr_clip={self.lr_clip} learns the clip ratios of run-time quantizers, and the IR "
                                "has none: give fake-quant a_granularity=token or kv=<bits>, or leave lr_clip at 0")
        try:
            return self._train(gm, ctx, qp, clips, data, teacher, taps, rank, world)
        finally:
            if clips is not None:
                clips.restore()
            qp.restore()

    def _train(self, gm, ctx, qp, clips, data, teacher, taps, rank, world) -> PassResult:
        adapters = qat_lora.make_adapters(qp, self.lora_rank, self.lora_alpha, self.seed) if self.lora_rank else {}
        osc = Oscillation(qp, self.osc_bits, self.damp, self.freeze, track=self.damp > 0 or self.freeze > 0)
        ti_steps = (self.intervene_steps or self.steps // 2) if self.intervene else 0
        n_out = len(flat_outputs(gm))
        views = {"ti": view(gm, taps.student("ti"), self.intervene, adapters)} if ti_steps else {}
        views["main"] = view(gm, taps.student("main"), (), adapters)
        groups = qp.groups(self.lr, self.lr_quant) + (clips.group(self.lr_clip) if clips is not None else [])
        if adapters:
            groups.append({"params": [t for a, b, _ in adapters.values() for t in (a, b)], "lr": self.lr, "name": "lora"})
        if not groups:
            raise TrainingError("nothing to train: quantizers=fixed with train_weights=false and no lora_rank")
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay, fused=self.fused_adam)
        names = set(self._state(qp, clips, osc, adapters))
        fp = qat_checkpoint.fingerprint(gm)
        start, ckpt_path = 0, None
        if self.checkpoint_dir and self.resume:
            found = qat_checkpoint.load(self.checkpoint_dir, fp, names)
            if found:
                start, stored, rec = found
                self._load(stored, qp, clips, osc, adapters)
                qat_checkpoint.load_optimizer(opt, stored, rec["param_groups"])
                ckpt_path = f"{self.checkpoint_dir}/{rec['tensors']}"
        good = {k: v.clone() for k, v in self._state(qp, clips, osc, adapters).items()}
        losses, parts, t0 = [], {}, time.perf_counter()
        bar = tqdm(total=self.steps, initial=min(start, self.steps), desc="qat", unit="step", leave=False,
                   disable=None if rank == 0 else True)
        model, phase = None, None
        try:
            for step in range(start, self.steps):
                want = "ti" if step < ti_steps else "main"
                if want != phase:
                    model, phase = None, want
                    model = qat_dist.wrap(views[phase], world, find_unused=bool(ti_steps))
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * self._rate(step)
                inputs, target = data.get(step, rank, world)
                loss, parts = self._step_loss(model, teacher, inputs, target, ctx, phase, n_out, taps, osc,
                                              data.index(step, rank, world))
                value = qat_dist.mean(loss, world)
                if not math.isfinite(value):
                    raise self._not_finite(step, value, parts, ckpt_path, (qp, clips, osc, adapters), good)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                qp.before_step()
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.clip)
                opt.step()
                qp.after_step()
                if clips is not None:
                    clips.after_step()
                osc.update()
                losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
                done = step + 1
                every = self.checkpoint_every and done % self.checkpoint_every == 0
                if self.checkpoint_dir and (done == self.steps or every):
                    ckpt_path = self._save(done, (qp, clips, osc, adapters), opt, fp, value, rank, world)
        finally:
            bar.close()
            osc.remove()
        elapsed = time.perf_counter() - t0
        if adapters:
            qat_lora.merge(qp, adapters)
        snap_biases(gm)
        _annotate(gm, self.quantizers)
        ran = max(0, self.steps - start)
        details = {"steps": self.steps, "start_step": start, "losses": losses, "seconds": elapsed,
                   "steps_per_s": ran / elapsed if elapsed > 0 and ran else 0.0, "checkpoint": ckpt_path,
                   "oscillation": osc.stats(), "last_parts": {k: float(v.detach()) for k, v in parts.items()},
                   "world_size": world, "qk_quantizers": taps.qk, "attention_maps": taps.maps,
                   "clip_ratios": clips.ratios() if clips is not None else {}}
        resumed = f" (resumed at step {start})" if start else ""
        summary = (f"{ran} steps{resumed}, loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses
                   else f"nothing to train: checkpoint at step {start} of {self.steps}")
        return PassResult(True, summary, details)

    def _rate(self, step: int) -> float:
        """The learning-rate factor at `step`: linear from 1/(warmup+1) to 1 over the warm-up steps, then
        cosine decay to zero over the rest of the run."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / (self.steps - self.warmup)))

    # ------------------------------------------------------------------ one step
    def _step_loss(self, model, teacher, inputs, target, ctx, phase, n_out, taps, osc, key=None):
        t_vals = {}
        t_outs = None
        if teacher is not None:
            t_all = teacher(key, inputs)
            t_outs, t_vals = t_all[:n_out], dict(zip(taps.teacher, t_all[n_out:]))
        extra = [t_vals[n] for n in self.intervene] if phase == "ti" else []
        s_all = model(*inputs, *extra)
        s_outs = s_all[:n_out]
        s_vals = dict(zip(taps.student(phase), s_all[n_out:]))
        parts = {}
        try:
            if self.loss == "task":
                parts["task"] = task_loss(s_outs[0], target, ctx.loss_fn)
            else:
                parts["distill"] = sum(distill_output(s, t, self.temperature, self.output_loss)
                                       for s, t in zip(s_outs, t_outs) if s.is_floating_point())
                if self.task_weight > 0 and target is not None:
                    parts["task"] = self.task_weight * task_loss(s_outs[0], target, ctx.loss_fn)
            if taps.feats:
                parts["features"] = self.feature_weight * sum(feature_loss(s_vals[n], t_vals[n]) for n in taps.feats)
            if taps.qk:
                qs, ts = [s_vals[n] for n in taps.qk], [t_vals[n] for n in taps.qk]
                parts["entropy"] = self.entropy_weight * entropy_loss([g.codes(s_vals) for g in taps.grids])
                parts["distribution"] = self.distribution_weight * distribution_loss(qs, ts)
            if taps.maps:
                parts["attention"] = self.attention_weight * attention_loss([s_vals[n] for n in taps.maps],
                                                                            [t_vals[n] for n in taps.maps])
        except TrainingError:
            raise
        except Exception as e:
            raise TrainingError(f"the {self.loss} loss failed on outputs {[list(o.shape) for o in s_outs]} and target "
                                f"{getattr(target, 'shape', target)}: {type(e).__name__}: {e}") from e
        if phase == "ti":
            parts["intervention"] = self.feature_weight * sum(feature_loss(s_vals[n], t_vals[n]) for n in self.intervene)
        damping = osc.loss()
        if damping is not None:
            parts["damping"] = damping
        return sum(parts.values()), parts

    # ------------------------------------------------------------------ state
    @staticmethod
    def _state(qp, clips, osc, adapters) -> dict[str, torch.Tensor]:
        return {**qp.state(), **(clips.state() if clips is not None else {}), **osc.tensors(), **qat_lora.tensors(adapters)}

    @staticmethod
    def _load(tensors, qp, clips, osc, adapters) -> None:
        qp.load(tensors), osc.load(tensors), qat_lora.load(adapters, tensors)
        if clips is not None:
            clips.load(tensors)

    def _save(self, step, trained, opt, fp, loss, rank, world) -> str:
        """Checkpoint `trained` = (qp, clips, osc, adapters) and the optimizer at `step`."""
        path = f"{self.checkpoint_dir}/qat-step{step:07d}.safetensors"
        if rank == 0:
            opt_tensors, groups = qat_checkpoint.optimizer_tensors(opt)
            record = {"fingerprint": fp, "pipeline": str(self), "loss": loss, "param_groups": groups, "world_size": world}
            path = qat_checkpoint.save(self.checkpoint_dir, step, {**self._state(*trained), **opt_tensors}, record)
        qat_dist.barrier(world)
        return path

    def _not_finite(self, step, value, parts, ckpt_path, trained, good) -> TrainingError:
        """Put the IR back to the last good state and describe the failure."""
        if ckpt_path:
            from safetensors.torch import load_file

            good = load_file(ckpt_path)
        self._load(good, *trained)
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in parts.items())
        kept = (f"the last good checkpoint is {ckpt_path}, and the IR holds its state" if ckpt_path
                else "no checkpoint was written; the IR holds its state from before training")
        return TrainingError(f"the loss is {value} at step {step + 1} ({terms}): training stopped; {kept}. "
                             "Lower lr/lr_quant, check the data for NaN/inf, or raise clip.")


def _check_ir(gm) -> None:
    if not fake_quants(gm):
        raise TrainingError("qat trains quantizers, and the IR has none: run fake-quant and calibrate before qat")
    for n in fake_quants(gm, "act"):
        if not n.meta["qc"].get("observed"):
            raise TrainingError(f"activation quantizer {n.name} has no range yet: run calibrate before qat")


def _traced_teacher(teacher, gm):
    """The user's teacher as a frozen IR traced at the student's example inputs."""
    from qcompiler.frontends.pytorch import trace

    return trace(teacher, example_inputs(gm))


@torch.no_grad()
def _annotate(gm, how: str) -> None:
    """Record in the IR that quantizer ranges were learned (range = the grid's float span)."""
    from qcompiler.ir import get_attr_tensor

    if how == "fixed":
        return
    for n in fake_quants(gm, "act"):
        s, z = float(get_attr_tensor(gm, n.args[1])), float(get_attr_tensor(gm, n.args[2]))
        n.meta["qc"].update(range=(round((n.args[3] - z) * s, 6), round((n.args[4] - z) * s, 6)), learned=how)
    for n in fake_quants(gm, "weight"):
        n.meta["qc"]["learned"] = how
