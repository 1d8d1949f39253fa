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
