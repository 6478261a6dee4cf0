"""Every attention family with every cache policy and backend: one table, each cell checked
once (`helpers.FAMILIES` x `helpers.OPTIONS`).

A cell the config takes is checked for: full-sequence logits against the float64
reference (tests/reference.py); cached decoding (a prompt and chunks shorter or longer than
a window's ring, then one token at a time far past it; `helpers.SCHEDULES`) against the
full-sequence logits, or for an int8 cache against the reference with quantized keys and
values; causality, through both; the parameters against `accounting.param_count` and the
widened MLP (`match_mha_params`) against MHA's; the cache `init_cache` allocates and
decoding leaves against `accounting.kv_cache_bytes`.
A cell the config refuses is checked to be refused, in one line.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (BASE, CHANGED, FAMILIES, LATENT, OPTIONS, REFUSED, REPO, ROWS, forward,
                     make, max_rel, param_count, reference_logits, refusal, row, row_config,
                     tokens)
from mqa import accounting
from mqa.attention import attend_latent_absorbed, attend_latent_expanded, expand_latent
from mqa.config import ConfigError, build_model_config, load_config_file
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.workdir import write_workdir
from reference import int8_round_trip

ROW_IDS = [f"{family}-{option}" for family, option in ROWS]
CELLS = [(family, option) for family in FAMILIES for option in OPTIONS]


@pytest.mark.parametrize("family, option", CELLS, ids=[f"{f}-{o}" for f, o in CELLS])
def test_the_config_refuses_exactly_the_cells_it_cannot_run(family, option):
    said = refusal(row_config(family, option))
    if (family, option) in REFUSED:
        assert said is not None and REFUSED[family, option] in said and "\n" not in said, said
    else:
        assert said is None


@pytest.mark.parametrize("family, option", ROWS, ids=ROW_IDS)
def test_logits_cached_decoding_and_causality(family, option):
    r = row(family, option)
    assert max_rel(r.full, r.reference) < 1e-5
    if r.model.config.kv_cache_dtype == "int8":
        quantized = reference_logits(r.model, r.toks, quantize_kv=True)
        error = max_rel(r.reference, quantized)
        assert error > 1e-4  # int8 changed something
        # Rounding may land on the other side of a half in float32: well under the int8 error.
        assert max_rel(r.decoded, quantized) < 0.1 * error
        # Training and evaluation never read the cache: the same program as a float cache's.
        exact = row(family, option.replace("int8", "local-global"))
        trace = lambda model: str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(model), s)(  # noqa: E731
            r.toks))(nnx.state(model)))
        assert trace(r.model) == trace(exact.model)
        # The next token each position's logits pick: the same at (nearly) every position.
        assert np.mean(r.decoded.argmax(-1) == exact.decoded.argmax(-1)) >= 0.95
    else:
        assert max_rel(r.decoded, r.full) < 1e-5
    # Changing token 9 changes no logit before position 9, and changes position 9.
    for before, after in [(r.full, r.full_changed), (r.decoded, r.decoded_changed)]:
        np.testing.assert_array_equal(before[:, :CHANGED], after[:, :CHANGED])
        assert np.abs(before[:, CHANGED] - after[:, CHANGED]).max() > 1e-4
    # Decoding left every buffer as init_cache made it, holding all 24 positions.
    empty = init_cache(r.model.config, *r.toks.shape[:1], r.model.config.max_seq_len)
    assert int(r.cache.index) == r.toks.shape[1]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), r.cache.layers) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), empty.layers)
    assert cache_nbytes(r.cache) == accounting.kv_cache_bytes(r.model.config, 2, 40)


@pytest.mark.parametrize("family, option", ROWS, ids=ROW_IDS)
def test_parameters_and_cache_bytes_are_as_accounted(family, option):
    config = row_config(family, option)
    assert param_count(config) == accounting.param_count(config)
    # The MLP widened to MHA's count (Shazeer 2019), against an MHA model built as such.
    mha = dataclasses.replace(config, attention="grouped", num_kv_heads=config.num_heads,
                              kv_share_every=1, kv_latent_dim=0, q_latent_dim=0, rope_head_dim=0)
    matched = build_model_config(dict(dataclasses.asdict(config), match_mha_params=True))
    assert abs(param_count(matched) - param_count(mha)) <= 1.5 * config.d_model * config.num_layers
    fewer = param_count(config) < param_count(mha)
    assert (matched.mlp_dim > config.mlp_dim) == fewer and (matched.mlp_dim < config.mlp_dim) == (
        param_count(config) > param_count(mha))
    if config.kv_share_every > 1:  # the layers that reuse their group's K/V have no K/V weights
        model = make(config=config)
        owned = set(nnx.to_pure_dict(nnx.state(model.blocks))["attention"])
        shared = set(nnx.to_pure_dict(nnx.state(model.shared_blocks))["attention"])
        assert owned - shared == {"grouped": {"k", "v"}, "tied": {"kv", "k_rope"}}[config.attention]
        assert shared < owned
    for kv_cache_dtype in ("", "int8"):
        changed = dataclasses.replace(config, kv_cache_dtype=kv_cache_dtype)
        for batch, context in [(1, 40), (3, 17), (2, 4)]:
            cache = jax.eval_shape(lambda: init_cache(changed, batch, context))
            allocated = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache.layers))
            assert allocated == accounting.kv_cache_bytes(changed, batch, context)


def test_cache_sizes_per_family():
    """Numbers cached per token and layer: grouped 2*kv*d, tied kv*d + d/2, latent c + r;
    int8 a byte each plus a 4-byte scale per token and head (latent: one, for the latent and
    rotary key cached side by side); a local layer's ring stays at the window however long
    the context."""
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
    mixed = dataclasses.replace(BASE, sliding_window=5, global_every=2)  # layer 0 local, 1 global
    assert accounting.kv_cache_bytes(mixed, 1, 40) == 2 * 2 * d * 4 * (40 + 5)


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


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=latent"], "model.attention='latent' needs model.kv_latent_dim >= 1"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=3"],
     "needs an even model.rope_head_dim >= 2"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.kv_share_every=2"], "model.kv_share_every=2 does not combine with model.attention='latent'"),
    (["model.kv_latent_dim=8"], "model.kv_latent_dim=8 is for model.attention='latent' only"),
    (["model.kv_latent_norm=false"], "model.kv_latent_norm=False is for model.attention='latent' only"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.rope_key_heads=3"], "model.rope_key_heads=3 must divide model.num_heads="),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.rope_frequency_dim=2"], "model.rope_frequency_dim=2 must be 0 or an even number >= "
     "model.rope_head_dim=4"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.rope_pairs=0,1,2"], "model.rope_pairs has 3 entries; it needs num_layers x "
     "rope_key_heads x rope_head_dim/2 = 2 x 1 x 2 = 4, or none"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.rope_frequency_dim=8", "model.rope_pairs=0,1,3,4"],
     "model.rope_pairs holds 4; each must be a frequency index in 0..3"),
    (["model.attention=latent", "model.kv_latent_dim=8", "model.rope_head_dim=4",
      "model.rope_pairs=0,x"], "model.rope_pairs=['0', 'x'] must be a list of integers"),
    (["model.rope_pairs=0,1"], "model.rope_pairs=['0', '1'] is for model.attention='latent' only"),
    (["model.attention=tied", "model.attention_impl=xla"],
     "model.attention_impl='xla' is for model.attention='grouped'"),
    (["model.global_every=2"], "model.global_every=2 needs model.sliding_window > 0"),
    (["model.sliding_window=64", "model.kv_share_every=2"],
     "model.sliding_window=64 does not combine with model.kv_share_every=2"),
    (["model.sliding_window=-1"], "model.sliding_window=-1 must be >= 0"),
    (["model.attention_sinks=4"], "model.attention_sinks=4 keeps the first positions visible "
     "through a sliding window and needs model.sliding_window > 0"),
    (["model.sliding_window=64", "model.attention_sinks=4", "model.attention_impl=blockwise"],
     "model.attention_sinks=4 does not combine with model.attention_impl='blockwise'; use 'einsum' or 'tiled'"),
    (["model.kv_cache_dtype=int2"], "model.kv_cache_dtype='int2' is not one of: '', 'int8', 'int4'"),
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
    from mqa import load_model
    config = load_config_file(REPO / "configs" / "tiny.py")
    model = make(config=build_model_config(config.model))
    write_workdir(tmp_path, config, nnx.state(model, nnx.Param), tokenizer=None)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("attention", "kv_latent_dim", "q_latent_dim", "rope_head_dim", "sliding_window",
                  "global_every", "kv_cache_dtype"):
        del saved["model"][field]
    del saved["train"]["trainable"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_model(tmp_path)
    assert loaded.model_config.attention == "grouped" and loaded.config.train.trainable == "all"
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(a, b)
    toks = tokens(length=8)
    np.testing.assert_allclose(loaded(toks), forward(model, toks), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    ["configs/gta.py", "model.kv_share_every=2"],
    ["configs/mla.py", "model.q_latent_dim=16"],
    ["configs/local_global.py", "model.sliding_window=16", "model.global_every=2",
     "model.kv_cache_dtype=int8"],
], ids=["tied-sharing", "latent-q", "local-global-int8"])
def test_train_resume_evaluate_and_sample(tmp_path, family, fast_compile):
    """Each family end to end as a user runs it, in this process: a run trained, then
    resumed; its held-out loss through `load_model` and `evaluate_tokens` (as eval.py
    computes it) equal to the trainer's final evaluation; scored through the cache (equal
    to the forward pass with a float cache; an int8 model is scored through its cache by
    default, close to but not equal to the forward pass); and a sample (`generate`).
    (The command lines themselves: test_train_cli.py, test_eval_cli.py.)"""
    from mqa import data, evaluation, load_model, trainer
    from mqa.decode import generate
    path, *changes = family
    tiny = [*changes, "model.d_model=32", "model.num_layers=2", "model.head_dim=4",
            "model.mlp_dim=64", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4",
            "train.log_every=1", "train.eval_every=4", "train.eval_batches=1",
            "train.final_eval_tokens=512", "checkpoint.every=2"]  # final evaluation: 16 windows
    trainer.train(load_config_file(REPO / path, [*tiny, "train.steps=2"]), tmp_path)
    final = trainer.train(load_config_file(REPO / path, [*tiny, "train.steps=4"]), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["final_eval_loss"] == pytest.approx(final["eval_loss"])

    model = load_model(tmp_path)
    assert model.step == 4
    corpus = data.load_corpus(model.config.data, tmp_path / "data", min_tokens=33)
    heldout = corpus.heldout[:16 * 32 + 1]  # the windows the final evaluation scored
    evaluate = lambda **kw: evaluation.evaluate_tokens(  # noqa: E731
        model, heldout, seq_len=32, batch_size=4, progress=False, **kw)
    plain = evaluate()
    assert plain["loss"] == pytest.approx(rows[-1]["final_eval_loss"], rel=1e-5)
    assert plain["tokens"] == rows[-1]["final_eval_tokens"]
    if model.model_config.kv_cache_dtype == "int8":  # scored through its cache by default
        forward_pass = evaluate(cached=False)
        assert 0 < abs(forward_pass["loss"] - plain["loss"]) < 0.01 * plain["loss"]
    else:
        assert evaluate(cached=True)["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    prompt = model.tokenizer.encode("ROMEO:")
    sample = generate(model, prompt, 24)
    assert model.tokenizer.decode(sample[0]).startswith("ROMEO:") and sample.shape == (1, 30)


def test_tools_for_grouped_heads_refuse_other_families_and_windows(tmp_path):
    """uptrain, the head analysis and to-hf say in one line what they cannot take."""
    from mqa import analysis
    from mqa.convert import convert_uptrain, export_hf
    for name, changes, tools in [
            ("tied", ["model.attention=tied"], ("uptrain", "heads", "to-hf")),
            ("window", ["model.sliding_window=8"], ("similarity", "heads", "to-hf"))]:
        config = load_config_file(REPO / "configs" / "tiny.py", changes)
        model = make(config=build_model_config(config.model))
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
