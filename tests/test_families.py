"""Attention families (grouped, tied, latent) and cache policies (sliding windows, int8),
against the float64 layer-by-layer references in tests/reference.py.

Each model is checked three ways: full-sequence logits against the reference; cached
decoding (a prompt, a chunk, then one token at a time, far past a window) against the
full-sequence logits; and the cache `init_cache` builds against `accounting`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import accounting
from mqa.attention import attend_latent_absorbed, attend_latent_expanded, expand_latent
from mqa.config import ConfigError, ModelConfig, load_config_file, build_model_config
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.model import Transformer
from reference import int8_round_trip, transformer_loops
from test_model import max_rel, tokens
from test_train_cli import REPO

BASE = build_model_config(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, max_seq_len=40)
LATENT = dict(attention="latent", kv_latent_dim=12, rope_head_dim=4)
FAMILIES = {
    "MHA": dict(num_kv_heads=4),
    "GQA": dict(),
    "MQA": dict(num_kv_heads=1),
    "tied": dict(attention="tied"),
    "tied-1": dict(attention="tied", num_kv_heads=1),
    "latent": LATENT,
    "latent-q": dict(LATENT, q_latent_dim=10),
}
WINDOWS = {"": dict(), "local": dict(sliding_window=5), "local/global": dict(sliding_window=5,
                                                                               global_every=2)}


def make(seed=0, **changes) -> Transformer:
    """A model whose norm scales are random too (ones would hide a mix-up)."""
    model = Transformer(dataclasses.replace(BASE, **changes), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    state = nnx.state(model, nnx.Param)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if "scale" in jax.tree_util.keystr(path) else x, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def reference_layers(model: Transformer) -> list[dict]:
    """Each layer's parameters as the reference names them, layer 0 first."""
    share = model.config.kv_share_every
    stacks = [nnx.to_pure_dict(nnx.state(model.blocks))]
    if share > 1:
        stacks.append(nnx.to_pure_dict(nnx.state(model.shared_blocks)))

    def layer(stack, index):
        flat = {}
        for part, params in stack.items():
            for name, value in params.items():
                if isinstance(value, dict):  # an RMSNorm inside attention: its scale
                    value = value["scale"]
                flat[part if name == "scale" else name] = np.asarray(value[index])
        return flat

    return [layer(stacks[0], i // share) if i % share == 0 else
            layer(stacks[1], (i // share) * (share - 1) + i % share - 1)
            for i in range(model.config.num_layers)]


def reference_logits(model: Transformer, toks, *, quantize_kv=False) -> np.ndarray:
    c = model.config
    return transformer_loops(
        reference_layers(model), model.embed[...], model.final_norm.scale[...], toks,
        kv_share_every=c.kv_share_every, theta=c.rope_theta, eps=c.norm_eps, attention=c.attention,
        sliding_window=c.sliding_window, global_every=c.global_every, quantize_kv=quantize_kv,
        q_latent=c.q_latent_dim > 0)


def decode_in_pieces(model: Transformer, toks, pieces=(7, 3)) -> np.ndarray:
    """Prefill `pieces[0]` tokens, then a chunk of `pieces[1]`, then one token at a time,
    through the jitted step; the logits of every position."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, toks, cache):
        return nnx.merge(graphdef, state).step(toks, cache)

    cache = init_cache(model.config, toks.shape[0], model.config.max_seq_len)
    bounds = [0, pieces[0], sum(pieces), *range(sum(pieces) + 1, toks.shape[1] + 1)]
    chunks = []
    for start, end in zip(bounds, bounds[1:]):
        logits, cache = step(state, toks[:, start:end], cache)
        chunks.append(logits)
    return np.asarray(jnp.concatenate(chunks, axis=1))


@pytest.mark.parametrize("name, window", [(name, "") for name in FAMILIES] + [
    (name, window) for name in ("MQA", "tied", "latent-q") for window in ("local", "local/global")])
def test_logits_and_cached_decoding_match_the_float64_reference(name, window):
    model = make(**FAMILIES[name], **WINDOWS[window])
    toks = tokens(length=24)
    full = model(toks)
    assert max_rel(full, reference_logits(model, toks)) < 1e-5
    # Decoding past the window (5) wraps each local layer's ring buffer several times.
    assert max_rel(decode_in_pieces(model, toks), full) < 1e-5


@pytest.mark.parametrize("name", ["GQA", "tied", "latent"])
def test_int8_cache_decodes_as_the_reference_with_quantized_keys_and_values(name):
    model = make(**FAMILIES[name], kv_cache_dtype="int8", sliding_window=6, global_every=2)
    toks = tokens(length=20)
    quantized = reference_logits(model, toks, quantize_kv=True)
    exact = reference_logits(model, toks)
    decoded = decode_in_pieces(model, toks)
    # Rounding may land on the other side of a half in float32: well under the int8 error.
    assert max_rel(decoded, quantized) < 0.1 * max_rel(exact, quantized)
    assert max_rel(exact, quantized) > 1e-4  # int8 changed something
    np.testing.assert_array_equal(model(toks), make(**FAMILIES[name], sliding_window=6,
                                                    global_every=2)(toks))  # training is exact


@pytest.mark.parametrize("name", ["GQA", "tied", "latent-q"])
def test_causality(name):
    """Changing token 9 changes no logit before position 9, with or without a window."""
    for window in ("", "local/global"):
        model = make(**FAMILIES[name], **WINDOWS[window])
        toks = tokens(length=16)
        changed = toks.at[:, 9].set((toks[:, 9] + 1) % BASE.vocab_size)
        a, b = np.asarray(model(toks)), np.asarray(model(changed))
        np.testing.assert_array_equal(a[:, :9], b[:, :9])
        assert np.abs(a[:, 9:] - b[:, 9:]).max() > 0


@pytest.mark.parametrize("name", ["GQA", "tied", "latent"])
def test_int8_cache_mostly_keeps_the_greedy_tokens(name):
    """The next token each position's logits pick, decoding through an int8 cache and
    through a float one: the same at (nearly) every position."""
    toks = tokens(length=24)
    int8 = decode_in_pieces(make(**FAMILIES[name], kv_cache_dtype="int8"), toks)
    exact = decode_in_pieces(make(**FAMILIES[name]), toks)
    assert np.mean(int8.argmax(-1) == exact.argmax(-1)) >= 0.95


def test_int8_round_trip_matches_the_reference():
    from mqa.kv_cache import dequantize, quantize
    x = np.random.default_rng(0).normal(size=(3, 5, 16)) * np.array([1e-3, 1.0, 50.0])[:, None, None]
    x[1, 2] = 0.0
    q, scale = quantize(jnp.asarray(x, jnp.float32))
    assert q.dtype == jnp.int8 and scale.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(dequantize(q, scale, jnp.float32)), int8_round_trip(x),
                               rtol=1e-6, atol=1e-9)


def test_absorbed_latent_attention_equals_the_expanded_form():
    rng = np.random.default_rng(0)
    b, t, s, h, d, c, r = 2, 3, 9, 4, 8, 12, 4
    arrays = [rng.normal(size=shape).astype(np.float32) for shape in
              [(b, t, h, d), (b, t, h, r), (b, s, c), (b, s, r), (c, h, d), (c, h, d)]]
    q, q_rope, latent, k_rope, k_up, v_up = arrays
    for mask in [dict(q_offset=6), dict(q_offset=6, window=4)]:
        expanded = attend_latent_expanded(q, q_rope, *expand_latent(latent, k_up, v_up), k_rope,
                                          **mask)
        cached = np.concatenate([latent, k_rope], -1)  # the cache holds both side by side
        absorbed = attend_latent_absorbed(q, q_rope, cached, k_up, v_up, **mask)
        assert max_rel(absorbed, expanded) < 1e-5


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("name", FAMILIES)
def test_the_cache_has_exactly_the_bytes_accounted(name, window, int8):
    config = dataclasses.replace(BASE, **FAMILIES[name], **WINDOWS[window],
                                 kv_cache_dtype="int8" if int8 else "")
    for batch, context in [(1, 40), (3, 17), (2, 4)]:
        cache = init_cache(config, batch, context)
        assert cache_nbytes(cache) == accounting.kv_cache_bytes(config, batch, context)


def test_cache_sizes_per_family():
    """Numbers cached per token and layer: grouped 2*kv*d, tied kv*d + d/2, latent c + r;
    int8 a byte each plus a 4-byte scale per token and head (latent: one, for the latent and
    rotary key cached side by side); a local layer's ring stays at
    the window however long the context."""
    per_token = lambda **c: accounting.kv_cache_bytes(dataclasses.replace(BASE, **c), 1, 40) / 40  # noqa: E731
    layers, d = BASE.num_layers, BASE.head_dim
    assert per_token() == layers * 2 * 2 * d * 4
    assert per_token(attention="tied") == layers * (2 * d + d // 2) * 4
    assert per_token(attention="tied", num_kv_heads=1) == layers * (d + d // 2) * 4
    assert per_token(**LATENT) == layers * (12 + 4) * 4
    assert per_token(kv_cache_dtype="int8") == layers * 2 * 2 * (d + 4)
    assert per_token(**LATENT, kv_cache_dtype="int8") == layers * (12 + 4 + 4)  # one vector
    local = dataclasses.replace(BASE, sliding_window=5)
    assert accounting.kv_cache_bytes(local, 1, 40) == accounting.kv_cache_bytes(local, 1, 5)
    mixed = dataclasses.replace(BASE, sliding_window=5, global_every=2)
    assert accounting.kv_cache_bytes(mixed, 1, 40) == 2 * 2 * 2 * d * 4 * (40 + 5)


@pytest.mark.parametrize("share", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_count_matches_the_model(name, share):
    if FAMILIES[name].get("attention") == "latent" and share > 1:
        return
    config = dataclasses.replace(BASE, **FAMILIES[name], kv_share_every=share)
    model = Transformer(config, rngs=nnx.Rngs(0))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counted == accounting.param_count(config)
    matched = build_model_config(dict(dataclasses.asdict(config), match_mha_params=True))
    mha = dataclasses.replace(BASE, num_kv_heads=BASE.num_heads)
    assert abs(accounting.param_count(matched) - accounting.param_count(mha)) <= \
        1.5 * BASE.d_model * BASE.num_layers


def test_tied_attention_shares_kv_across_layers():
    """Tied attention composes with cross-layer sharing: the reference reuses the first
    layer's tied state and rotary key; cached decoding agrees."""
    model = make(attention="tied", kv_share_every=2)
    assert "kv" not in nnx.to_pure_dict(nnx.state(model.shared_blocks))["attention"]
    toks = tokens(length=16)
    full = model(toks)
    assert max_rel(full, reference_logits(model, toks)) < 1e-5
    assert max_rel(decode_in_pieces(model, toks), full) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=latent"], "model.attention='latent' needs model.kv_latent_dim >= 1"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=3"],
     "needs an even model.rope_head_dim >= 2"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.kv_share_every=2"], "model.kv_share_every=2 does not combine with model.attention='latent'"),
    (["model.kv_latent_dim=8"], "model.kv_latent_dim=8 is for model.attention='latent' only"),
    (["model.attention=tied", "model.attention_impl=xla"],
     "model.attention_impl='xla' is for model.attention='grouped'"),
    (["model.global_every=2"], "model.global_every=2 needs model.sliding_window > 0"),
    (["model.sliding_window=64", "model.kv_share_every=2"],
     "model.sliding_window=64 does not combine with model.kv_share_every=2"),
    (["model.sliding_window=-1"], "model.sliding_window=-1 must be >= 0"),
    (["model.kv_cache_dtype=int4"], "model.kv_cache_dtype='int4' is not one of: '', 'int8'"),
    (["model.attention=mla"], "model.attention='mla' is not one of: 'grouped', 'tied', 'latent'"),
    (["model.attention=latent", "model.kv_latent_dim=2048", "model.rope_head_dim=4",
      "model.match_mha_params=true"], "matched model.mlp_dim=-"),
])
def test_family_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "tiny.py", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_workdirs_saved_before_the_families_still_load(tmp_path):
    """A config.json without the fields added since (model.attention, ..., train.trainable)
    loads with them at their defaults."""
    import json

    from mqa import load_model
    from mqa.workdir import write_workdir
    config = load_config_file(REPO / "configs" / "tiny.py")
    model = Transformer(build_model_config(config.model), rngs=nnx.Rngs(0))
    write_workdir(tmp_path, config, nnx.state(model, nnx.Param), tokenizer=None)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("attention", "kv_latent_dim", "q_latent_dim", "rope_head_dim", "sliding_window",
                  "global_every", "kv_cache_dtype"):
        del saved["model"][field]
    del saved["train"]["trainable"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_model(tmp_path)
    assert loaded.model_config.attention == "grouped" and loaded.config.train.trainable == "all"
    toks = tokens(length=8)
    np.testing.assert_array_equal(loaded.module()(toks), model(toks))


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    ["--config=configs/gta.py", "--config.model.kv_share_every=2"],
    ["--config=configs/mla.py", "--config.model.q_latent_dim=32"],
    ["--config=configs/local_global.py", "--config.model.kv_cache_dtype=int8"],
])
def test_train_checkpoint_resume_eval_and_sample_from_the_command_line(tmp_path, family):
    """Each family end to end as a user runs it: train.py (tiny sizes), a resumed run,
    eval.py on the held-out split (equal to the trainer's final evaluation), eval.py
    --cached (through the cache: equal to the forward pass with a float cache; an int8
    model is scored through its cache by default, close to but not equal to --nocached),
    and eval.py --sample."""
    import json

    from test_eval_cli import eval_py
    from test_train_cli import run_train
    tiny = [*family, "--config.model.d_model=64", "--config.model.num_layers=4",
            "--config.model.head_dim=8", "--config.model.mlp_dim=128",
            "--config.train.seq_len=96", "--config.train.batch_size=4", "--config.train.log_every=1",
            "--config.train.eval_every=4", "--config.train.eval_batches=1",
            "--config.checkpoint.every=2"]
    run_train(tmp_path, *tiny, "--config.train.steps=2")
    run_train(tmp_path, *tiny, "--config.train.steps=4")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    final = rows[-1]

    def evaluate(*args):
        result = eval_py(f"--workdir={tmp_path}", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    plain = evaluate()
    assert plain["loss"] == pytest.approx(final["final_eval_loss"], rel=1e-5)
    assert plain["tokens"] == final["final_eval_tokens"]
    if "--config.model.kv_cache_dtype=int8" in family:  # scored through its cache by default
        forward = evaluate("--nocached")
        assert 0 < abs(forward["loss"] - plain["loss"]) < 0.01 * plain["loss"]
    else:
        assert evaluate("--cached")["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    sample = eval_py(f"--workdir={tmp_path}", "--sample", "--prompt=ROMEO:", "--max_new_tokens=120",
                     "--temperature=0")
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:"), sample.stderr


def test_tools_for_grouped_heads_refuse_other_families_and_windows(tmp_path):
    """uptrain, the head analysis and to-hf say in one line what they cannot take."""
    from mqa import analysis
    from mqa.convert import convert_uptrain, export_hf
    from mqa.workdir import write_workdir
    for name, changes, tools in [
            ("tied", ["model.attention=tied"], ("uptrain", "heads", "to-hf")),
            ("window", ["model.sliding_window=8"], ("similarity", "heads", "to-hf"))]:
        config = load_config_file(REPO / "configs" / "tiny.py", changes)
        model = Transformer(build_model_config(config.model), rngs=nnx.Rngs(0))
        write_workdir(tmp_path / name, config, nnx.state(model, nnx.Param), tokenizer=None)
        calls = {
            "uptrain": lambda: convert_uptrain(tmp_path / name, tmp_path / f"{name}-u", 1),
            "similarity": lambda: convert_uptrain(tmp_path / name, tmp_path / f"{name}-s", 1,
                                                  group="similarity"),
            "heads": lambda: analysis.heads(str(tmp_path / name), None, None, 1, 16),
            "to-hf": lambda: export_hf(tmp_path / name, tmp_path / f"{name}-hf"),
        }
        for tool in tools:
            with pytest.raises(ValueError) as error:
                calls[tool]()
            assert "\n" not in str(error.value), (name, tool)
            assert ("attention" in str(error.value) or "sliding_window" in str(error.value)), \
                (name, tool, str(error.value))
