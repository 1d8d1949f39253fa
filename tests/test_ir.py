"""Tracing into the IR, its text form and the verifier."""

import os

import pytest
import torch

import qcompiler as qc
from qcompiler.ir import propagate_shapes, verify

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(name: str, text: str):
    """Compare with tests/golden/<name>; QC_UPDATE_GOLDEN=1 rewrites the file."""
    path = os.path.join(GOLDEN, name)
    if os.environ.get("QC_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()


def test_trace_keeps_batch_dynamic(tiny_mlp):
    """An IR traced at batch 1 runs at other batch sizes and equals the model."""
    ir = qc.trace(tiny_mlp, (torch.randn(1, 8),))
    assert ir.meta["qc"]["dynamic_batch"]
    x = torch.randn(5, 8)
    assert torch.equal(ir(x), tiny_mlp(x))


def test_print_ir_golden(tiny_mlp):
    """The text form of a traced MLP is stable (symbolic batch printed as s0)."""
    golden("mlp_traced.txt", qc.print_ir(qc.trace(tiny_mlp, (torch.randn(2, 8),))))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.export cannot trace it
            return x * 2
        return x


def test_untraceable_model_says_why_and_what_to_try():
    """A model torch.export cannot trace raises TraceError with the reason and advice."""
    with pytest.raises(qc.TraceError) as e:
        qc.trace(DataDependent(), (torch.randn(2, 3),))
    assert "could not trace DataDependent" in str(e.value)
    assert "torch.cond" in str(e.value)


def test_non_tensor_example_inputs_are_refused(tiny_mlp):
    """Example inputs must be tensors."""
    with pytest.raises(qc.TraceError, match="example input 0 is a list"):
        qc.trace(tiny_mlp, ([1.0, 2.0],))


def test_verifier_catches_a_broken_graph(tiny_mlp):
    """A rewrite that breaks shapes fails verification with the reason."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    lin = next(n for n in ir.graph.nodes if n.name == "linear_1")
    lin.update_arg(0, next(n for n in ir.graph.nodes if n.op == "placeholder"))  # 8 features into a 16-input layer
    ir.recompile()
    with pytest.raises(qc.VerificationError, match="no longer traces"):
        verify(ir)


def test_propagate_shapes_fills_new_nodes(tiny_mlp):
    """After inserting a node, shape propagation gives it a (symbolic) shape."""
    ir = qc.trace(tiny_mlp, (torch.randn(2, 8),))
    x = next(n for n in ir.graph.nodes if n.op == "placeholder")
    with ir.graph.inserting_after(x):
        neg = ir.graph.call_function(torch.ops.aten.neg.default, (x,))
    ir.recompile()
    propagate_shapes(ir)
    assert list(neg.meta["val"].shape)[1] == 8
