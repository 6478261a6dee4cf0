"""The same language model in PyTorch, for side-by-side training throughput.

Layer for layer what `mqa.model.Transformer` computes: tied embeddings, pre-norm RMSNorm,
q/k/v/out projections without biases, rotary embeddings in the rotate-half layout, GQA
through `scaled_dot_product_attention(enable_gqa=True)`, SwiGLU, and the same AdamW
(b2 = 0.95, weight decay off for norm scales) with global-norm clipping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mqa.config import ModelConfig


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; pairs dimension i with i + head_dim / 2."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


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
