"""The same language model in PyTorch, for side-by-side training and decoding speed.

Layer for layer what `mqa.model.Transformer` computes (without cross-layer K/V sharing):
tied embeddings, pre-norm RMSNorm, q/k/v/out projections without biases, rotary
embeddings in the rotate-half layout, GQA through `scaled_dot_product_attention(
enable_gqa=True)`, SwiGLU, and the same AdamW (b2 = 0.95, weight decay off for norm
scales) with global-norm clipping. `load_jax_params` copies an mqa model's weights in.

For decoding, `make_decode_loop` is the loop a performance-minded PyTorch user would write
by hand: a preallocated cache written in place, grouped heads attending without repeating
K/V in memory, under `torch.inference_mode`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from mqa.config import ModelConfig


def rope_angles(theta: float, head_dim: int, positions: torch.Tensor) -> tuple:
    """(cos, sin), each [len(positions), head_dim / 2]."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., seq, head_dim]; pairs dimension i with i + head_dim / 2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim] at positions 0, 1, ..."""
    return rotate(x, *rope_angles(theta, x.shape[-1], torch.arange(x.shape[-2])))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.attention_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.q = nn.Linear(c.d_model, c.num_heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=False)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.gate = nn.Linear(c.d_model, c.mlp_dim, bias=False)
        self.up = nn.Linear(c.d_model, c.mlp_dim, bias=False)
        self.down = nn.Linear(c.mlp_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (b, t, _) = self.c, x.shape
        h = self.attention_norm(x)
        heads = lambda y, n: y.view(b, t, n, c.head_dim).transpose(1, 2)  # noqa: E731
        q = rope(heads(self.q(h), c.num_heads), c.rope_theta)
        k = rope(heads(self.k(h), c.num_kv_heads), c.rope_theta)
        v = heads(self.v(h), c.num_kv_heads)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  enable_gqa=c.num_kv_heads != c.num_heads)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp_norm(x)
        return self.down(F.silu(self.gate(h)) * self.up(h))

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               position: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per sequence. x: [batch, d_model]; keys, values: the cache
        [batch, kv_heads, max_len, head_dim], written at `position` in place; cos, sin:
        that position's rotary angles [head_dim / 2]."""
        c, b = self.c, x.shape[0]
        h = self.attention_norm(x)
        keys[:, :, position] = rotate(self.k(h).view(b, c.num_kv_heads, c.head_dim), cos, sin)
        values[:, :, position] = self.v(h).view(b, c.num_kv_heads, c.head_dim)
        # [b, kv, group, head_dim] against [b, kv, len, head_dim]: no repeated K/V.
        q = rotate(self.q(h).view(b, c.num_kv_heads, c.group_size, c.head_dim), cos, sin)
        scores = q @ keys[:, :, :position + 1].transpose(-1, -2) * c.head_dim ** -0.5
        attended = scores.softmax(-1) @ values[:, :, :position + 1]
        x = x + self.out(attended.reshape(b, -1))
        return x + self.mlp(x)


class TorchTransformer(nn.Module):
    """tokens: int64 [batch, seq] -> float32 logits [batch, seq, vocab]."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.final_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.embed.weight.T

    def decode(self, tokens: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]],
               position: int, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """tokens: int64 [batch] at `position` -> logits [batch, vocab]; `cache` holds a
        (keys, values) pair per layer, updated in place; angles: `rope_angles` (cos, sin)
        for every position of the cache."""
        x = self.embed(tokens)
        cos, sin = angles[0][position], angles[1][position]
        for block, (keys, values) in zip(self.blocks, cache):
            x = block.decode(x, keys, values, position, cos, sin)
        return self.final_norm(x) @ self.embed.weight.T


def load_jax_params(model: TorchTransformer, params) -> TorchTransformer:
    """Copies an mqa model's parameters (its state from `nnx.split`, or `nnx.state(model,
    nnx.Param)`; tied embeddings, no K/V sharing) into `model`. mqa keeps [in, heads,
    head_dim] kernels stacked over layers; torch's Linear keeps [out, in]."""
    value = lambda array: torch.from_numpy(np.array(array))  # noqa: E731
    params = nnx.to_pure_dict(params)
    blocks = params["blocks"]
    kernels = {"q": blocks["attention"]["q"], "k": blocks["attention"]["k"],
               "v": blocks["attention"]["v"], "out": blocks["attention"]["out"],
               "gate": blocks["mlp"]["gate"], "up": blocks["mlp"]["up"],
               "down": blocks["mlp"]["down"]}
    with torch.no_grad():
        model.embed.weight.copy_(value(params["embed"]))
        model.final_norm.weight.copy_(value(params["final_norm"]["scale"]))
        for i, block in enumerate(model.blocks):
            for name, kernel in kernels.items():
                w = value(kernel)[i]
                w = w.reshape(-1, w.shape[-1]) if name == "out" else w.reshape(w.shape[0], -1)
                getattr(block, name).weight.copy_(w.T)
            block.attention_norm.weight.copy_(value(blocks["attention_norm"]["scale"])[i])
            block.mlp_norm.weight.copy_(value(blocks["mlp_norm"]["scale"])[i])
    return model


def make_decode_loop(model: TorchTransformer, batch: int, context: int, steps: int):
    """(run, cache, angles): `run(first=None)` greedily decodes `steps` tokens after
    `first` (int64 [batch], default zeros) for `batch` sequences whose cache holds `context`
    positions, returning the tokens int64 [batch, steps]. The cache, (keys, values) per
    layer for `context + steps` positions, and the rotary table are made once."""
    c = model.blocks[0].c
    shape = (batch, c.num_kv_heads, context + steps, c.head_dim)
    cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.blocks]
    angles = rope_angles(c.rope_theta, c.head_dim, torch.arange(context + steps))

    def run(first: torch.Tensor | None = None) -> torch.Tensor:
        token = torch.zeros(batch, dtype=torch.long) if first is None else first
        out = []
        with torch.inference_mode():
            for i in range(steps):
                token = model.decode(token, cache, context + i, angles).argmax(-1)
                out.append(token)
        return torch.stack(out, 1)

    return run, cache, angles


def make_train_step(model: nn.Module, learning_rate: float, weight_decay: float,
                    grad_clip: float):
    """`step(batch: int64 [batch, seq + 1]) -> loss`: one AdamW update, as mqa's."""
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    others = [p for name, p in model.named_parameters() if "norm" not in name]
    optimizer = torch.optim.AdamW([{"params": others, "weight_decay": weight_decay},
                                   {"params": norms, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.95))

    def step(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    return step
