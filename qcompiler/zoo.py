"""Small reference models and the scikit-learn digits data, shared by the examples, the
tests and the benchmarks: an MLP, a digits CNN and one transformer encoder block with its
attention products written as explicit matmuls (so they quantize as activation x
activation integer products).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """For 1x8x8 digit images: two 3x3 convolutions, a pooling and two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: multi-head self-attention and a GELU feed-forward."""

    def __init__(self, d: int = 256, heads: int = 4, ffn: int = 1024):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.reshape(b, t, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.dh), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def digits(seed: int = 0):
    """scikit-learn's 8x8 digits as (x_train, y_train, x_test, y_test); x in [0, 1], NCHW."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def train_classifier(model: nn.Module, x, y, epochs: int = 30, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """A few epochs of Adam on (x, y) from a fresh initialization drawn with `seed` (every
    submodule's `reset_parameters`), so the trained model depends only on the seed and the
    data; seconds on a CPU for the digits models."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y, batch: int | None = None) -> float:
    """Top-1 accuracy of `fn` on (x, y), fed in batches of `batch` (all at once if None)."""
    batch = batch or len(x)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x) - len(x) % batch if batch < len(x) else len(x), batch):
            correct += int((fn(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    n = (len(x) // batch) * batch if batch < len(x) else len(x)
    return correct / n
