"""Small transformers for the accuracy passes' tests: a Llama-like decoder (RMSNorm, grouped
query attention, SiLU-gated MLP, tied embeddings), the same with pre-LayerNorm, and a
post-LayerNorm (BERT-like) block. Weights are random with a few outlier channels, as real
models have, so that smoothing and rotations have something to fix."""

import functools

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        x = x.to(torch.float32)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Attention(nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        rep = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, t, self.hd).reshape(b, self.h, t, self.hd)
        v = v[:, :, None].expand(b, self.kv, rep, t, self.hd).reshape(b, self.h, t, self.hd)
        mask = torch.full((t, t), float("-inf")).triu(1)
        p = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.hd**-0.5 + mask, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).contiguous().reshape(b, t, -1)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, hidden, norm):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(d), norm(d)
        self.self_attn, self.mlp = Attention(d, heads, kv_heads), MLP(d, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    """Decoder-only LM: ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab=64, d=48, heads=3, kv_heads=1, hidden=96, layers=2, norm=RMSNorm, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, kv_heads, hidden, norm) for _ in range(layers))
        self.norm = norm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in SmolLM2
        with torch.no_grad():
            self.embed_tokens.weight[:, :3] *= 12.0  # outlier channels in the residual stream
            for blk in self.layers:
                blk.mlp.up_proj.weight[:5] *= 8.0  # outliers entering down_proj
                if isinstance(blk.input_layernorm, nn.LayerNorm):
                    for ln in (blk.input_layernorm, blk.post_attention_layernorm):
                        ln.weight.uniform_(0.5, 1.5)
                        ln.bias.uniform_(-0.2, 0.2)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(self.norm(x))


class PostNormBlock(nn.Module):
    """BERT-like: x = LN(x + attn(x)); x = LN(x + mlp(x)), float inputs."""

    def __init__(self, d=48, heads=3, hidden=96):
        super().__init__()
        torch.manual_seed(1)
        self.attn, self.ln1 = Attention(d, heads, heads), nn.LayerNorm(d)
        self.fc1, self.fc2, self.ln2 = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x):
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))


def ids(batch=2, t=16, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def calib_ids(n=4, batch=2, t=16, vocab=64):
    return [ids(batch, t, vocab, seed=100 + i) for i in range(n)]


@functools.lru_cache(maxsize=None)
def traced(norm: str = "rms"):
    """(model, IR) of a TinyLM traced once per test session; tests take `copy_ir` of the IR."""
    import qcompiler as qc

    m = TinyLM(norm=nn.LayerNorm if norm == "ln" else RMSNorm).eval()
    return m, qc.trace(m, (ids(),))
