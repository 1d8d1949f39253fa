"""Row sums of the float kernels (layer_norm, softmax) split into vectorized partial sums."""

import numpy as np
import torch
import tvm
from tvm import te, topi

import qcompiler as qc
from qcompiler.backends.reduction_schedule import LANES, schedule_row_sums
from qcompiler.backends.verify import verify_nodes


def _layer_norm_func(rows: int, width: int):
    x = te.placeholder((rows, width), "float32", "x")
    g, b = te.placeholder((width,), "float32", "g"), te.placeholder((width,), "float32", "b")
    return te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)])


def test_layer_norm_sums_are_split_vectorized_and_agree():
    """A 256-wide layer_norm gets LANES vectorized partial sums per row (two rfactor blocks) and
    computes what torch does to 1e-6 relative, with rows of very different means and scales."""
    func = schedule_row_sums(_layer_norm_func(16, 256))
    assert func is not None
    text = func.script()
    assert text.count("_rf_update\"") == 2 and "T.vectorized(" in text
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 100, (16, 1)) + rng.uniform(-50, 50, (16, 1))).astype(np.float32)
    g, b = rng.standard_normal(256).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, g, b)], out)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (256,), torch.from_numpy(g), torch.from_numpy(b)).numpy()
    assert np.abs(out.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_short_or_ragged_rows_and_no_sums_are_left_alone():
    """Rows shorter than 4 vectors or not a multiple of LANES, and functions without a sum, are
    not rescheduled (None)."""
    assert schedule_row_sums(_layer_norm_func(4, 2 * LANES)) is None
    assert schedule_row_sums(_layer_norm_func(4, 8 * LANES + 3)) is None
    x = te.placeholder((4, 64), "float32", "x")
    assert schedule_row_sums(te.create_prim_func([x, topi.exp(x)])) is None


def _passes_run(target: str, mod) -> list[str]:
    from qcompiler.backends.dot_schedule import dot_pipeline
    from qcompiler.backends.targets import get_target, tvm_target

    names = []

    @tvm.instrument.pass_instrument
    class Record:
        def run_before_pass(self, _mod, info):
            names.append(info.name)

    tgt = tvm.target.Target(tvm_target(get_target(target)))
    with tvm.transform.PassContext(instruments=[Record()]):
        dot_pipeline(tgt)(mod)
    return names


def test_cpu_builds_split_the_sums_and_microcontrollers_do_not():
    """The host and arm pipelines run ScheduleRowSums; cortex-m (no vector unit) does not; and the
    host build of a layer_norm model still matches the IR node by node (layer_norm within 1e-5)."""
    from qcompiler.backends.lowering import to_relax

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64) * 3 + 1
    art = qc.compile(model, (x,), calib=[torch.randn(16, 64) * 3 + 1])
    ran = {t: _passes_run(t, to_relax(art.ir, (x,))) for t in ("host", "arm", "cortex-m4")}
    assert "qc.ScheduleRowSums" in ran["host"] and "qc.ScheduleRowSums" in ran["arm"]
    assert "qc.ScheduleRowSums" not in ran["cortex-m4"] and "qc.ScheduleDots" in ran["cortex-m4"]
    checks = verify_nodes(art.ir, (x,))
    assert any(c.op == "aten.layer_norm" for c in checks) and all(c.ok for c in checks), checks
