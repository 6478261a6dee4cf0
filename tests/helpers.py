"""What the model-layer tests share (test modules import this, never each other; the tool
tests share `commands.py` and `model_files.py`).

- `BASE`, `make`: tiny models. Their parameters are drawn with NumPy at the initializer's
  scales (normal / sqrt(fan-in), embeddings 0.02) and the norm scales uniform in 0.5..1.5
  (ones would hide a mix-up), so building one compiles nothing; the initializer itself
  is what every training test runs.
- `tokens`, `qkv`, `max_rel`, `param_count`.
- `forward`, `decode`: full-sequence logits and cached decoding (a prompt, chunks, then one
  token at a time), each one jitted function per model structure.
- `reference_layers`, `reference_logits`: a model through the float64 reference in
  `tests/reference.py`.
- `FAMILIES` x `OPTIONS`: the one table every attention family is checked in with every
  cache policy and backend (test_families.py); `REFUSED`: the combinations the config
  refuses, and what it says; `row(family, option)`: one table row's model run once for
  every check that needs it.
- `jit`, `fast_compile`: XLA's quick compile, for a test's own functions and for what the
  library compiles, in tests of values (the numbers are the same up to rounding; tests of
  what XLA compiles, its memory or its FLOPs, do not use them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mqa.config import ConfigError, ModelConfig, build_model_config, default_config, validate
from mqa.kv_cache import KVCache, init_cache
from mqa.model import Transformer
from reference import transformer_loops

REPO = pathlib.Path(__file__).resolve().parents[1]

# vocab 64, d_model 32 = 4 heads of 8, 2 K/V heads, 2 layers, einsum attention.
BASE = build_model_config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, mlp_dim=48, max_seq_len=40, attention_impl="einsum")

# A small MQA model with local (window 5) and global layers, as Gemma 3 has them, and
# Gemma 3's switches (tests/test_gemma_model.py).
WINDOWED = dict(num_kv_heads=1, num_layers=4, sliding_window=5, global_every=2, rope_theta=500.0)
GEMMA = dict(qk_norm=True, post_norms=True, norm_scale="one_plus_weight",
             mlp_activation="gelu_tanh", rope_local_theta=10.0, embed_scale=True,
             attention_score_dim=12)

# ----------------------------------------------------------------------------- the table

LATENT = dict(attention="latent", kv_latent_dim=12, rope_head_dim=4)
FAMILIES = {
    "MHA": dict(num_kv_heads=4),
    "GQA": dict(),
    "MQA": dict(num_kv_heads=1),
    "tied": dict(attention="tied"),
    "tied-1": dict(attention="tied", num_kv_heads=1),
    "latent": LATENT,
    # low-rank queries, and a converted model's options: 2 rotary keys (each read by 2 query
    # heads), each turning at 2 of the 4 frequencies of an 8-dim head, its own per layer
    # (rope_pairs [2 layers, 2 keys, 2 pairs]), a latent without its norm, and queries and
    # keys of 6 non-rotary numbers beside values of 8
    "latent-q": dict(LATENT, q_latent_dim=10, rope_key_heads=2, rope_frequency_dim=8,
                     kv_latent_norm=False, rope_pairs=(3, 0, 1, 2, 2, 3, 0, 1), qk_nope_dim=6),
}
WINDOW = dict(sliding_window=5)  # decoding 24 tokens wraps a local layer's ring 4 times
LOCAL_GLOBAL = dict(WINDOW, global_every=2)  # layer 0 local, layer 1 global
OPTIONS = {
    "none": dict(),
    "local": WINDOW,
    "local-global": LOCAL_GLOBAL,
    "int8": dict(LOCAL_GLOBAL, kv_cache_dtype="int8"),  # int8 rings and int8 global buffers
    "sinks": dict(LOCAL_GLOBAL, attention_sinks=2, kv_cache_dtype="int8"),  # 2 sinks + a ring of 5
    "sharing": dict(num_layers=4, kv_share_every=2),  # two groups of two layers
    "tiled": dict(attention_impl="tiled", attention_block=5),  # 24 tokens: 5 tiles, one short
    "tiled-local-global": dict(LOCAL_GLOBAL, attention_impl="tiled", attention_block=5),
    "blockwise": dict(attention_impl="blockwise", attention_block=4),
    "blockwise-local-global": dict(LOCAL_GLOBAL, attention_impl="blockwise", attention_block=4),
    "xla": dict(attention_impl="xla"),
}
_BACKEND = "model.attention_impl='{}' is for model.attention='grouped'; model.attention='{}'"
_LATENT_SHARING = "model.kv_share_every=2 does not combine with model.attention='latent'"
REFUSED = {  # (family, option) -> what the config says (one line)
    **{(f, "sharing"): _LATENT_SHARING for f in ("latent", "latent-q")},
    **{(f, option): _BACKEND.format(option.split("-")[0], FAMILIES[f]["attention"])
       for f in ("tied", "tied-1", "latent", "latent-q")
       for option in ("blockwise", "blockwise-local-global", "xla")},
}
ROWS = [(f, o) for f in FAMILIES for o in OPTIONS if (f, o) not in REFUSED]
# How a row decodes (`decode`'s chunk, chunks): by default a 4-token prompt and two 4-token
# chunks, each shorter than a 5-position ring, the second wrapping it; a whole ring of
# local layers and an int8 cache take a 7-token prompt, longer than the ring (sinks: a
# 9-token prompt, longer than the 2 sinks and the ring of 5 together). Then every
# row decodes the rest a token at a time.
SCHEDULES = {"local": (7, 1), "int8": (7, 1), "sinks": (9, 1)}


def row_config(family: str, option: str) -> ModelConfig:
    return dataclasses.replace(BASE, **FAMILIES[family], **OPTIONS[option])


def refusal(config: ModelConfig) -> str | None:
    """What `mqa.config.validate` says about a model config within a full experiment
    config (None: it takes it)."""
    full = default_config()
    full.model.update(dataclasses.asdict(config))
    full.train.seq_len = min(full.train.seq_len, config.max_seq_len)
    try:
        validate(full)
    except ConfigError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------- models


def fill(abstract: nnx.State, seed: int) -> nnx.State:
    """Random parameters for an abstract state (`nnx.eval_shape`): normal / sqrt(fan-in)
    (a stacked block's weights [layers, inputs, ...]; `out` [layers, heads, dim, m] takes
    heads x dim), embeddings normal x 0.02, every norm scale uniform in 0.5..1.5."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        names = [str(getattr(key, "key", key)) for key in path]
        if "scale" in names:
            value = rng.uniform(0.5, 1.5, x.shape)
        elif names[0] == "embed":
            value = rng.normal(0.0, 0.02, x.shape)
        else:
            stacked = names[0] in ("blocks", "shared_blocks")
            inputs = x.shape[1:3] if names[-1] == "out" else x.shape[1:2] if stacked else x.shape[:1]
            value = rng.standard_normal(x.shape) / np.sqrt(np.prod(inputs))
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def _built(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    return graphdef, fill(abstract, seed)


def make(seed: int = 0, config: ModelConfig = BASE, **changes) -> Transformer:
    """A fresh module of `config` with `changes` (its own variables, so changing one leaves
    the next `make` alone; the arrays are shared and immutable); the same seed and shapes
    give the same parameters."""
    graphdef, state = _built(dataclasses.replace(config, **changes), seed)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def param_count(model_or_config) -> int:
    """Parameters a model has, or one built from a config would have (nothing computed)."""
    model = model_or_config
    if isinstance(model, ModelConfig):
        model = nnx.eval_shape(lambda: Transformer(model_or_config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def tokens(batch: int = 2, length: int = 12, seed: int = 0, vocab: int = BASE.vocab_size) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def max_rel(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def qkv(batch: int, length: int, heads: int, kv_heads: int, dim: int, seed: int = 0) -> list[jax.Array]:
    """Random float32 queries [batch, length, heads, dim], keys and values [..., kv_heads, dim]."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, dim)] + 2 * [(batch, length, kv_heads, dim)]
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


# XLA's quick compile on CPU (a quarter of the time for these tiny models): no LLVM
# optimization, and the older, simpler code emitters. Every HLO pass still runs; what is
# computed is the same up to rounding.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
                    xla_cpu_use_fusion_emitters=False) if jax.default_backend() == "cpu" else {}


def jit(fun=None, **kwargs):
    """`jax.jit` with `FAST_COMPILE`, for tests of values (not of what XLA compiles)."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)


@contextlib.contextmanager
def fast_compile():
    """What the library compiles in the block, without XLA's slowest optimization passes
    (about half the compile time of a tiny model; `jit` does more for a test's own
    functions); what it computes is the same up to rounding."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


# ----------------------------------------------------------------------------- running


@jit(static_argnums=0)
def _forward(graphdef, state, toks):
    return nnx.merge(graphdef, state)(toks)


def forward(model: Transformer, toks) -> np.ndarray:
    """Full-sequence logits, jitted (one compile per model structure)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(toks, jnp.int32)))


def _decode_steps(model: Transformer, toks, chunk: int, chunks: int) -> tuple[jax.Array, KVCache]:
    """Feeds the first `chunks` x `chunk` tokens through `model.step` a chunk at a time (the
    prompt, then chunks at later positions), then each remaining token alone, each through
    a `lax.scan` as generation runs; every position's logits and the final cache."""
    cache = init_cache(model.config, toks.shape[0], model.config.max_seq_len)

    def feed(cache, piece):
        logits, cache = model.step(piece, cache)
        return cache, logits

    split = chunk * chunks
    pieces = toks[:, :split].reshape(toks.shape[0], chunks, chunk).swapaxes(0, 1)
    cache, first = jax.lax.scan(feed, cache, pieces)  # [chunks, batch, chunk, vocab]
    cache, rest = jax.lax.scan(feed, cache, toks[:, split:].T[:, :, None])  # [rest, batch, 1, vocab]
    first = first.swapaxes(0, 1).reshape(toks.shape[0], split, -1)
    return jnp.concatenate([first, rest[:, :, 0].swapaxes(0, 1)], axis=1), cache


@jit(static_argnums=(0, 3, 4))
def _decode(graphdef, state, toks, chunk, chunks):
    return _decode_steps(nnx.merge(graphdef, state), toks, chunk, chunks)


def decode(model: Transformer, toks, chunk: int = 4, chunks: int = 3) -> tuple[np.ndarray, KVCache]:
    """(The logits of every position decoded through the cache, the final cache): the
    first `chunks` x `chunk` tokens `chunk` at a time, then one at a time (by default a
    4-token prompt and two chunks, the second wrapping a 5-position ring, then 12 tokens
    alone)."""
    graphdef, state = nnx.split(model)
    logits, cache = _decode(graphdef, state, jnp.asarray(toks, jnp.int32), chunk, chunks)
    return np.asarray(logits), cache


# ----------------------------------------------------------------------------- the reference


def reference_layers(model: Transformer) -> list[dict]:
    """Each layer's parameters as `reference.transformer_loops` names them, layer 0 first."""
    share = model.config.kv_share_every
    numpy = lambda module: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))  # noqa: E731
    stacks = [numpy(model.blocks)]
    if share > 1:
        stacks.append(numpy(model.shared_blocks))

    def layer(stack, index):
        flat = {}
        for part, params in stack.items():
            for name, value in params.items():
                if isinstance(value, dict):  # an RMSNorm inside attention: its scale
                    value = value["scale"]
                flat[part if name == "scale" else name] = value[index]
        return flat

    return [layer(stacks[0], i // share) if i % share == 0 else
            layer(stacks[1], (i // share) * (share - 1) + i % share - 1)
            for i in range(model.config.num_layers)]


def reference_logits(model: Transformer, toks, *, quantize_kv: bool = False) -> np.ndarray:
    """The model's logits from the float64 reference (tied or untied embeddings, Gemma's
    switches included)."""
    c = model.config
    layers = reference_layers(model)
    if c.rope_pairs:  # latent attention's per-head rotary frequencies: config, not weights
        layers = [dict(layer, rope_pairs=c.layer_rope_pairs(i)) for i, layer in enumerate(layers)]
    return transformer_loops(
        layers, model.embed[...], model.final_norm.scale[...], toks,
        kv_share_every=c.kv_share_every, theta=c.rope_theta, eps=c.norm_eps, attention=c.attention,
        sliding_window=c.sliding_window, global_every=c.global_every, quantize_kv=quantize_kv,
        q_latent=c.q_latent_dim > 0, unembed=None if c.tie_embeddings else model.unembed[...],
        local_theta=c.rope_local_theta, score_dim=c.attention_score_dim or None,
        embed_scale=c.embed_scale, one_plus=c.norm_scale == "one_plus_weight",
        activation=c.mlp_activation, rope_dim=c.rope_head_dim if c.attention == "grouped" else 0,
        sinks=c.attention_sinks, rope_frequency_dim=c.rope_frequency_dim,
        rope_global_every=c.rope_global_every)


# ----------------------------------------------------------------------------- table rows

CHANGED = 9  # the position `row` changes a token at (causality)


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row's model run once: on `toks` [2, 24] and on `changed` (`toks` with
    position CHANGED replaced), the full-sequence logits and the logits decoded through the
    cache (`decode`), and the cache after decoding `toks`."""

    model: Transformer
    toks: jax.Array
    changed: jax.Array
    full: np.ndarray
    decoded: np.ndarray
    cache: KVCache
    full_changed: np.ndarray
    decoded_changed: np.ndarray

    @functools.cached_property
    def reference(self) -> np.ndarray:
        return reference_logits(self.model, self.toks)


@functools.lru_cache(maxsize=None)
def row(family: str, option: str) -> Row:
    """Two compiled programs, `forward` and `decode`, apart: where two rows' programs are
    the same (a backend changes only the forward pass, int8 only decoding) the session's
    persistent compilation cache (conftest.py) compiles them once."""
    model = make(config=row_config(family, option))
    toks = tokens(length=24)
    changed = toks.at[:, CHANGED].set((toks[:, CHANGED] + 1) % BASE.vocab_size)
    schedule = SCHEDULES.get(option, (4, 3))
    (decoded, cache), (decoded_changed, _) = (decode(model, t, *schedule) for t in (toks, changed))
    full, full_changed = forward(model, toks), forward(model, changed)
    return Row(model, toks, changed, full, decoded, cache, full_changed, decoded_changed)


# ----------------------------------------------------------------------------- workdirs


def loaded(model: Transformer) -> "LoadedModel":
    """`model` as `mqa.load_model` returns a trained one (default config, byte tokenizer)."""
    from mqa import data
    from mqa.loading import LoadedModel
    graphdef, params = nnx.split(model)
    return LoadedModel(default_config(), model.config, graphdef, params, data.ByteTokenizer(), 0, None)
