"""Shared fixtures: small models and data, built once per session."""

import warnings

import pytest
import torch

from qcompiler import zoo

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*|copyreg")


@pytest.fixture(scope="session")
def digits_data():
    return zoo.digits()


@pytest.fixture(scope="session")
def digits_cnn(digits_data):
    x, y, _, _ = digits_data
    return zoo.train_classifier(zoo.DigitsCNN(), x, y, epochs=8)


@pytest.fixture(scope="session")
def digits_mlp(digits_data):
    x, y, _, _ = digits_data
    return zoo.train_classifier(zoo.MLP(), x.flatten(1), y, epochs=10)


@pytest.fixture()
def tiny_mlp():
    torch.manual_seed(0)
    return zoo.MLP(d_in=8, hidden=16, d_out=4).eval()


def calib_batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def assert_matches_ir(art, x, got=None):
    """The artifact's outputs (or `got`) against its IR: integers exactly; floats within 1e-5 of
    the largest magnitude (FMA contraction on aarch64, another summation order on a GPU)."""
    from qcompiler.ir import as_tuple

    got, ref = as_tuple(art(x) if got is None else got), as_tuple(art.ir(x))
    assert len(got) == len(ref)
    for y, r in zip(got, ref):
        assert y.dtype == r.dtype and y.shape == r.shape
        if r.dtype.is_floating_point:
            assert float((y - r).abs().max()) <= 1e-5 * float(r.abs().max())
        else:
            assert torch.equal(y, r)
