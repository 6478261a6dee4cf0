"""A decoder-only Transformer language model in Flax NNX.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> gated MLP -> residual),
rotary position embeddings, tied or untied embeddings. The blocks' parameters are stacked
along a leading layer axis. Gemma 3's variations are config switches whose defaults keep
the Llama computation op for op: norms after attention and the MLP too (`post_norms`),
RMSNorms scaled by 1 + weight (`norm_scale`, `mqa.norm`), GeGLU (`mlp_activation`,
`mqa.mlp`), embeddings scaled by sqrt(d_model) (`embed_scale`), a RoPE base of its own for
local layers (`rope_local_theta`, chosen per layer like the window), and in grouped
attention query/key norms and the attention scale (`qk_norm`, `attention_score_dim`).

One layer loop, `_group`, runs every use of the model: a group is a K/V layer and the
`kv_share_every - 1` layers that reuse its keys and values (cross-layer sharing; a group is
one layer without it). The model computes the group's keys once (`project_kv`), writes
them into the cache when there is one (`kv_cache.write`), and hands the same `Keys` to
every layer of the group; each family only projects and attends (`attention/protocol.py`).
  - `__call__` (training, evaluation; `Mode.SELF`) scans `_group` over the stacked
    parameters with `jax.lax.scan`, so compile time does not grow with depth;
  - `step` (prefill, decoding; `Mode.CACHED`) calls `_group` once per group with that
    group's parameters and cache buffers, so a compiled decoding loop never copies one
    stacked cache array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa import kv_cache
from mqa.attention import Keys, Mode, family, self_attention
from mqa.kv_cache import KVCache
from mqa.mlp import GatedMLP
from mqa.model_config import ModelConfig
from mqa.norm import model_norm
from mqa.rope import LayerRope


class Block(nnx.Module):
    """One pre-norm Transformer layer with `model.attention`'s family; `owns_kv=False` for
    a layer that reuses the K/V of its group's first layer (cross-layer KV sharing). With
    `post_norms` also attention_post_norm and mlp_post_norm (Gemma's sandwich norms)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        self.attention_norm = model_norm(config.d_model, config)
        self.attention = family(config)(config, rngs=rngs, owns_kv=owns_kv)
        self.mlp_norm = model_norm(config.d_model, config)
        self.mlp = GatedMLP(config, rngs=rngs)
        if config.post_norms:
            self.attention_post_norm = model_norm(config.d_model, config)
            self.mlp_post_norm = model_norm(config.d_model, config)


def _stacked_blocks(config: ModelConfig, count: int, rngs: nnx.Rngs, owns_kv: bool) -> Block:
    """`count` Blocks whose parameters are stacked along a leading axis."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs, owns_kv=owns_kv)

    return make(rngs)


GroupParams = tuple[nnx.State, tuple[nnx.State, ...]]  # (the K/V layer's, each sharing layer's)


class Transformer(nnx.Module):
    """The language model. tokens: int32 [batch, seq] -> logits float32 [batch, seq, vocab].

    The layers form `num_kv_layers` groups of `kv_share_every` consecutive layers: group g
    is `blocks[g]`, which computes keys and values, then `shared_blocks[g * (s - 1) + j]`
    for j < s - 1, which attend to them. Without sharing (s = 1) every layer is in `blocks`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(nnx.initializers.normal(stddev=0.02)(
            rngs.params(), (config.vocab_size, config.d_model)))
        # Every parameter of these has a leading layer axis.
        self.blocks = _stacked_blocks(config, config.num_kv_layers, rngs, owns_kv=True)
        if config.kv_share_every > 1:
            self.shared_blocks = _stacked_blocks(
                config, config.num_layers - config.num_kv_layers, rngs, owns_kv=False)
        self.final_norm = model_norm(config.d_model, config)
        if not config.tie_embeddings:
            self.unembed = nnx.Param(nnx.initializers.normal(stddev=config.d_model ** -0.5)(
                rngs.params(), (config.d_model, config.vocab_size)))

    def __call__(self, tokens: jax.Array, *, attention_inputs: bool = False):
        """Full-sequence logits. tokens: int32 [batch, seq] -> float32 [batch, seq, vocab].

        attention_inputs: also return what each layer's attention read, float32
          [num_layers, batch, seq, d_model] (its normalised input), in the order the layers
          run (mqa.head_similarity computes attention patterns from it).
        """
        config = self.config
        positions = jnp.arange(tokens.shape[1])
        per_group = config.kv_share_every - 1
        shared = None
        if per_group:  # [groups * per_group, ...] -> [groups, per_group, ...]
            shared = jax.tree.map(lambda a: a.reshape(-1, per_group, *a.shape[1:]),
                                  nnx.state(self.shared_blocks))
        # Each layer's window and, when local layers have their own, RoPE base (sliding
        # windows exclude kv_share_every > 1, so a group is one layer).
        windows = (jnp.array([config.window(i) for i in range(config.num_layers)], jnp.int32)
                   if config.sliding_window else None)
        thetas = (jnp.array([config.layer_rope_theta(i) for i in range(config.num_layers)],
                            jnp.float32) if config.rope_local_theta else None)
        # and a latent layer's rotary pairs [layers, rope_key_heads, rope_head_dim / 2], when set
        pairs = (jnp.stack([config.layer_rope_pairs(i) for i in range(config.num_layers)])
                 if config.rope_pairs else None)

        def scanned(x, params):
            first, stacked, window, theta, layer_pairs = params
            layers = tuple(jax.tree.map(lambda a: a[j], stacked) for j in range(per_group))
            rope = LayerRope(config.rope_theta if theta is None else theta, layer_pairs)
            x, _, inputs = self._group(x, positions, (first, layers), window, rope, Mode.SELF)
            return x, (jnp.stack(inputs) if attention_inputs else None)

        if config.remat:
            scanned = jax.checkpoint(scanned)
        x, inputs = jax.lax.scan(scanned, self._embed(tokens),
                                 (nnx.state(self.blocks), shared, windows, thetas, pairs),
                                 unroll=config.scan_unroll)
        logits = self._logits(x)
        if attention_inputs:
            return logits, inputs.reshape(config.num_layers, *inputs.shape[2:])
        return logits

    def step(self, tokens: jax.Array, cache: KVCache,
             layers: tuple[GroupParams, ...] | None = None, *,
             wrap: bool = False) -> tuple[jax.Array, KVCache]:
        """Extends a cached sequence: the prompt at prefill, one token per decode step.

        tokens: int32 [batch, new]; cache: `KVCache` with `cache.index + new <= max_len`.
        layers: `self.layer_params()`, computed once outside a decoding loop so that the
          loop does not slice every layer's weights out of the stack at every token.
        wrap: every layer's buffers are rings (continuous batching, `mqa.serving`): the
          write head runs on past max_len, each row seeing its own last positions.
        Returns (float32 logits [batch, new, vocab], the cache with `new` more positions).
        """
        config = self.config
        positions = cache.index + jnp.arange(tokens.shape[1])
        if cache.starts is not None:  # a ragged batch: each row's positions [batch, new]
            positions = positions[None, :] - cache.starts[:, None]
        x = self._embed(tokens)
        updated = []
        for g, params in enumerate(layers or self.layer_params()):
            layer = g * config.kv_share_every
            window = config.sliding_window if config.is_local(layer) else None
            rope = LayerRope(config.layer_rope_theta(layer), config.layer_rope_pairs(layer))
            x, buffers, _ = self._group(x, positions, params, window, rope, Mode.CACHED,
                                        cache.layers[g], cache.index, cache.starts,
                                        ring=wrap or window is not None)
            updated.append(buffers)
        return self._logits(x), cache._replace(layers=tuple(updated),
                                               index=cache.index + tokens.shape[1])

    def layer_params(self) -> tuple[GroupParams, ...]:
        """Per KV group: (its first layer's parameters, the other layers' parameters),
        sliced out of the stacked blocks."""
        groups, per_group = self.config.num_kv_layers, self.config.kv_share_every - 1
        first = nnx.state(self.blocks)
        shared = nnx.state(self.shared_blocks) if per_group else None
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        return tuple((take(first, g), tuple(take(shared, g * per_group + j)
                                            for j in range(per_group)))
                     for g in range(groups))

    def _group(self, x: jax.Array, positions: jax.Array, params: GroupParams,
               window: jax.Array | int | None, rope: LayerRope, mode: Mode,
               buffers: dict | None = None, index: jax.Array | None = None,
               starts: jax.Array | None = None, ring: bool = False
               ) -> tuple[jax.Array, dict | None, list[jax.Array]]:
        """The layer loop: one K/V group. x: [batch, seq, m]; positions: int [seq] (or
        [batch, seq]: a ragged batch's, whose rows start at slots `starts`); rope: the
        group's RoPE base (and rotary pairs).

        SELF: the keys are this sequence's (window and rope may be traced); CACHED: the
        group's cache `buffers` take the new keys at `index` (`ring`: the buffers are a ring,
        as a local layer's are). Returns (x after the group's layers, the updated buffers or
        None, each layer's attention input [batch, seq, m]).
        """
        config = self.config
        backend = self_attention(config.attention_impl, config.attention_block)
        first, shared = params
        blocks = [nnx.merge(nnx.graphdef(self.blocks), first)]
        if shared:
            blocks += [nnx.merge(nnx.graphdef(self.shared_blocks), p) for p in shared]
        keys, inputs = None, []
        for block in blocks:
            h = block.attention_norm(x)
            inputs.append(h)
            queries = block.attention.queries(h, positions, rope)
            if keys is None:  # the group's first layer computes (and caches) its keys
                new = block.attention.project_kv(h, positions, rope)
                if mode is Mode.SELF:
                    keys = Keys.of_activations(new, kv_cache.cache_entries(config))
                else:
                    axes = kv_cache.entry_axes(config, x.shape[0])
                    buffers, keys = kv_cache.write(buffers, new, axes, index, ring=ring,
                                                   dtype=jnp.dtype(config.dtype),
                                                   sinks=config.attention_sinks)
                    keys = kv_cache.for_rows(keys, starts)
            attended = block.attention.attend(queries, keys, mode=mode, window=window, backend=backend)
            if config.post_norms:
                attended = block.attention_post_norm(attended)
            x = x + attended
            mlp_out = block.mlp(block.mlp_norm(x))
            if config.post_norms:
                mlp_out = block.mlp_post_norm(mlp_out)
            x = x + mlp_out
        return x, buffers, inputs

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [batch, seq] -> [batch, seq, m] in the compute dtype; with
        `embed_scale` multiplied by sqrt(d_model) in float32 (Gemma)."""
        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.config.embed_scale:
            x = x * jnp.float32(self.config.d_model ** 0.5)
        return x.astype(jnp.dtype(self.config.dtype))

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        unembed = self.embed[...].T if self.config.tie_embeddings else self.unembed[...]
        return jnp.einsum("btm,mv->btv", x, unembed.astype(jnp.dtype(self.config.dtype)),
                          preferred_element_type=jnp.float32)
