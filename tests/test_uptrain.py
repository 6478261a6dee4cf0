"""Uptraining (Ainslie et al. 2023): `mqa.convert uptrain` pools MHA K/V heads into GQA/MQA
heads, and `train.init_from` starts a fresh run from the result.

Sources are random configs/tiny.py-sized MHA models written straight to a workdir, so no
test needs a training run except the end-to-end ones.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import mqa
from mqa import data, trainer
from mqa.config import ConfigError, build_model_config
from mqa.convert.__main__ import main as convert_cli
from mqa.convert.uptrain import KV_PROJECTIONS
from mqa.model import Transformer
from mqa.training import cross_entropy
from mqa.workdir import data_config, params_by_name, params_from_names, write_workdir
from commands import REPO, assert_one_line_error, run_train
from uptrain_sources import (HEADS, TOKENS, calibration_text, random_params, tiny_config, uptrain_error,
                             write_source)

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile









def logits(config, params) -> np.ndarray:
    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: Transformer(build_model_config(config.model), rngs=nnx.Rngs(0))))
    return np.asarray(nnx.merge(graphdef, params)(TOKENS))


def uptrain(src, out, num_kv_heads, init="mean") -> mqa.LoadedModel:
    convert_cli(["uptrain", "--src", str(src), "--num_kv_heads", str(num_kv_heads),
                  "--workdir", str(out), "--init", init])
    return mqa.load_model(out)


def kv(params) -> dict[str, np.ndarray]:
    attention = nnx.to_pure_dict(params)["blocks"]["attention"]
    return {"k": np.asarray(attention["k"]), "v": np.asarray(attention["v"])}


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("init, num_kv_heads, share", [
    ("mean", 1, 1), ("mean", 2, 1), ("first", 2, 1),
    ("mean", 1, 2),  # cross-layer KV sharing: layer 1 uses layer 0's K/V
])
def test_pooling_identical_heads_keeps_the_logits(tmp_path, init, num_kv_heads, share):
    """When the K/V heads of each group are equal, GQA/MQA computes exactly what MHA did."""
    config = tiny_config(f"model.kv_share_every={share}")
    params = random_params(config)
    group = HEADS // num_kv_heads
    pure = nnx.to_pure_dict(params)
    for name in ("k", "v"):  # every head takes its group's first head: [layers, m, heads, d]
        kernel = np.asarray(pure["blocks"]["attention"][name])
        pure["blocks"]["attention"][name] = np.repeat(kernel[:, :, ::group], group, axis=2)
    nnx.replace_by_pure_dict(params, pure)
    source = write_source(tmp_path / "mha", config, params)

    loaded = uptrain(source, tmp_path / "out", num_kv_heads, init)
    assert loaded.model_config.num_kv_heads == num_kv_heads
    np.testing.assert_allclose(loaded(TOKENS), logits(config, params), atol=1e-5, rtol=0)


def test_uptraining_to_the_same_heads_is_the_identity(tmp_path, capsys):
    config, params = tiny_config(), random_params(tiny_config())
    loaded = uptrain(write_source(tmp_path / "mha", config, params), tmp_path / "out", HEADS)
    assert "K/V heads 4 -> 4" in capsys.readouterr().out
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded.params, params))
    # The parameters are equal bit for bit (above); two compiled programs' logits to rounding.
    np.testing.assert_allclose(loaded(TOKENS), logits(config, params), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config.to_dict()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (tmp_path / "mha" / "tokenizer.json").read_bytes()


def test_mean_pooling_matches_numpy_and_copies_the_rest(tmp_path, capsys):
    config, params = tiny_config(), random_params(tiny_config())
    loaded = uptrain(write_source(tmp_path / "mha", config, params), tmp_path / "out", 2)
    summary = capsys.readouterr().out
    assert "K/V heads 4 -> 2 (mean-pooled in groups of 2)" in summary
    assert "parameters 123,200 -> 115,008" in summary and "KV cache 1,024 -> 512 bytes/token" in summary

    source, converted = kv(params), kv(loaded.params)
    for name in ("k", "v"):
        layers, m, _, d = source[name].shape
        expected = np.zeros((layers, m, 2, d))
        for layer in range(layers):
            for group in range(2):
                heads = [source[name][layer, :, 2 * group + j, :].astype(np.float64) for j in range(2)]
                expected[layer, :, group, :] = (heads[0] + heads[1]) / 2
        np.testing.assert_allclose(converted[name], expected, rtol=1e-6, atol=1e-7)
    others = lambda state: {k: v for k, v in params_by_name(state).items()  # noqa: E731
                            if k not in KV_PROJECTIONS}
    assert jax.tree.all(jax.tree.map(np.array_equal, others(loaded.params), others(params)))


def test_similarity_grouping_pools_the_heads_that_attend_alike(tmp_path, capsys):
    """Heads 0 and 3, and 1 and 2, made identical (queries, keys, values): grouping by
    attention similarity pools exactly those pairs, which leaves the logits as they were;
    adjacent grouping pools unlike heads and changes them."""
    config, params = tiny_config(), random_params(tiny_config())
    pure = nnx.to_pure_dict(params)
    for name in ("q", "k", "v"):
        kernel = np.asarray(pure["blocks"]["attention"][name]).copy()  # [layers, m, heads, d]
        kernel[:, :, 3], kernel[:, :, 2] = kernel[:, :, 0], kernel[:, :, 1]
        pure["blocks"]["attention"][name] = kernel
    nnx.replace_by_pure_dict(params, pure)
    source = write_source(tmp_path / "mha", config, params)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife.\n" * 8)
    convert_cli(["uptrain", "--src", str(source), "--num_kv_heads", "2", "--workdir",
                  str(tmp_path / "similar"), "--group", "similarity", "--text", str(text)])
    assert "groups by attention similarity, per K/V layer: (0,3)(1,2) (0,3)(1,2)" in \
        capsys.readouterr().out
    similar = mqa.load_model(tmp_path / "similar")
    np.testing.assert_allclose(similar(TOKENS), logits(config, params), atol=2e-5, rtol=0)
    adjacent = uptrain(source, tmp_path / "adjacent", 2)
    assert np.max(np.abs(adjacent(TOKENS) - logits(config, params))) > 1e-2


def test_first_and_random_inits(tmp_path):
    config, params = tiny_config(), random_params(tiny_config())
    source = write_source(tmp_path / "mha", config, params)
    first = kv(uptrain(source, tmp_path / "first", 2, "first").params)
    assert np.array_equal(first["k"], kv(params)["k"][:, :, ::2])

    random = uptrain(source, tmp_path / "random", 1, "random")
    fresh = Transformer(random.model_config, rngs=nnx.Rngs(config.train.seed))
    assert np.array_equal(kv(random.params)["v"], np.asarray(fresh.blocks.attention.v[...]))
    assert kv(random.params)["k"].shape == (2, 64, 1, 16)


def test_widened_mlp_keeps_its_width(tmp_path):
    """A GQA source with match_mha_params: the output writes its mlp_dim out explicitly."""
    config = tiny_config("model.num_kv_heads=2", "model.match_mha_params=true")
    source_mlp = build_model_config(config.model).mlp_dim
    assert source_mlp > config.model.mlp_dim
    loaded = uptrain(write_source(tmp_path / "gqa", config, random_params(config)),
                     tmp_path / "out", 1)
    assert (loaded.config.model.mlp_dim, loaded.config.model.match_mha_params) == (source_mlp, False)
    assert loaded.model_config.mlp_dim == source_mlp


# ----------------------------------------------------------------------------- calibrated




def commuting_rotation(rng, d: int, rope_dim: int) -> np.ndarray:
    """A random orthogonal [d, d] that commutes with RoPE on the last rope_dim dimensions:
    any orthogonal matrix on the others, a 2-D rotation in each rotary plane (0: all rotary)."""
    rope_dim = rope_dim or d
    free, half = d - rope_dim, rope_dim // 2
    r = np.zeros((d, d))
    r[:free, :free] = np.linalg.qr(rng.normal(size=(free, free)))[0] if free else r[:0, :0]
    for i, angle in enumerate(rng.uniform(-np.pi, np.pi, half)):
        a, b = free + i, free + half + i
        r[np.ix_([a, b], [a, b])] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return r


@pytest.mark.parametrize("rope_dim", [0, 8])
def test_rope_commuting_rotations_commute_and_are_recovered(rope_dim):
    from mqa.convert.aligned import rope_commuting_rotation
    from mqa.rope import apply_partial_rope
    rng = np.random.default_rng(3)
    r = commuting_rotation(rng, 16, rope_dim)
    x = rng.normal(size=(1, 5, 1, 16))
    positions = np.arange(5)
    rotate = lambda a: np.asarray(apply_partial_rope(np.float32(a), positions, 10000.0, rope_dim), np.float64)  # noqa: E731
    np.testing.assert_allclose(rotate(x @ r), rotate(x) @ r, atol=1e-5)
    source = rng.normal(size=(200, 16))
    np.testing.assert_allclose(rope_commuting_rotation(source, source @ r, rope_dim), r, atol=1e-10)


def rotated_copies(config, rope_dim: int):
    """(MHA params whose K/V heads are rotated copies of head 0, with the rotations folded
    into the queries and output rows, the MQA params they equal): the two compute the same
    function, so aligning and pooling the MHA heads must give back the MQA model's logits."""
    params = random_params(config)
    rng = np.random.default_rng(4)
    arrays = params_by_name(params)
    q, k, v, out = (arrays[f"blocks.attention.{n}"].astype(np.float64) for n in ("q", "k", "v", "out"))
    mqa_arrays = dict(arrays)
    mqa_arrays["blocks.attention.k"], mqa_arrays["blocks.attention.v"] = k[:, :, :1], v[:, :, :1]
    for layer in range(q.shape[0]):
        for j in range(1, HEADS):  # MHA: query head j reads K/V head j
            r, u = commuting_rotation(rng, 16, rope_dim), np.linalg.qr(rng.normal(size=(16, 16)))[0]
            k[layer, :, j], v[layer, :, j] = k[layer, :, 0] @ r, v[layer, :, 0] @ u
            q[layer, :, j] = q[layer, :, j] @ r
            out[layer, j] = u.T @ out[layer, j]
    for name, array in zip(("q", "k", "v", "out"), (q, k, v, out)):
        arrays[f"blocks.attention.{name}"] = array.astype(np.float32)
    mqa_config = tiny_config("model.num_kv_heads=1", f"model.rope_head_dim={rope_dim}")
    return (params_from_names(build_model_config(config.model), arrays),
            logits(mqa_config, params_from_names(build_model_config(mqa_config.model), mqa_arrays)))


@pytest.mark.parametrize("rope_dim", [0, 8])
def test_aligned_merging_recovers_heads_that_are_rotated_copies(tmp_path, capsys, rope_dim):
    """Rotated copies of one head pooled into MQA: aligning first gives back the model
    they equal; the plain mean does not."""
    config = tiny_config(f"model.rope_head_dim={rope_dim}")
    params, expected = rotated_copies(config, rope_dim)
    source = write_source(tmp_path / "mha", config, params)
    np.testing.assert_allclose(logits(config, params), expected, atol=2e-5, rtol=0)
    convert_cli(["uptrain", "--src", str(source), "--num_kv_heads", "1", "--init", "aligned",
                  "--text", str(calibration_text(tmp_path)), "--workdir", str(tmp_path / "aligned")])
    assert "aligned on calibration text, then mean-pooled in groups of 4" in capsys.readouterr().out
    np.testing.assert_allclose(mqa.load_model(tmp_path / "aligned")(TOKENS), expected, atol=1e-4, rtol=0)
    mean = uptrain(source, tmp_path / "mean", 1)
    assert np.max(np.abs(mean(TOKENS) - expected)) > 1e-2


def test_alignment_keeps_the_function(tmp_path):
    """Rotating each head onto the others (before pooling) changes no logit."""
    from mqa.convert import aligned, calibration
    config = tiny_config("model.rope_head_dim=8")
    params = random_params(config)
    source = mqa.load_model(write_source(tmp_path / "mha", config, params))
    inputs = calibration.attention_inputs(source, calibration.calibration_tokens(
        source, calibration_text(tmp_path), windows=4, seq_len=64))
    rotated = aligned.align_kv_heads(params_by_name(params), source.model_config, inputs, 1)
    assert not np.allclose(rotated["blocks.attention.k"], params_by_name(params)["blocks.attention.k"])
    np.testing.assert_allclose(logits(config, params_from_names(source.model_config, rotated)),
                               logits(config, params), atol=2e-5, rtol=0)


def test_cross_layer_sharing_layout_and_least_squares(tmp_path, capsys):
    """--kv_share_every 2: layer 0's parameters stay in blocks, layer 1's (but K/V) move to
    shared_blocks; "first" keeps layer 0's K/V, and "aligned" is the float64 (ridge)
    least-squares solution of the normal equations, which fits the group's keys better than either."""
    from mqa.convert import calibration
    from mqa.convert.cross_layer import RIDGE
    config, params = tiny_config(), random_params(tiny_config())
    source = write_source(tmp_path / "mha", config, params)
    text = calibration_text(tmp_path)
    src = params_by_name(params)
    for init in ("first", "aligned"):
        convert_cli(["uptrain", "--src", str(source), "--kv_share_every", "2", "--init", init,
                      "--text", str(text), "--workdir", str(tmp_path / init)])
    assert "K/V shared by 2 layers (a least-squares fit on calibration text)" in capsys.readouterr().out
    first, fitted = (params_by_name(mqa.load_model(tmp_path / i).params) for i in ("first", "aligned"))
    for name, array in src.items():
        if name.startswith("blocks.") and name not in KV_PROJECTIONS:
            assert np.array_equal(first[name], array[:1]) and np.array_equal(first["shared_" + name], array[1:])
    assert np.array_equal(first["blocks.attention.k"], src["blocks.attention.k"][:1])

    loaded = mqa.load_model(source)
    x = calibration.attention_inputs(loaded, calibration.calibration_tokens(loaded, text)).astype(np.float64)
    for name in KV_PROJECTIONS:
        w = src[name].reshape(2, 64, -1).astype(np.float64)
        target = (x[0] @ w[0] + x[1] @ w[1]) / 2
        gram = x[0].T @ x[0] + RIDGE * np.trace(x[0].T @ x[0]) / 64 * np.eye(64)
        normal = np.linalg.solve(gram, x[0].T @ target)
        np.testing.assert_allclose(fitted[name].reshape(64, -1), normal, atol=2e-4, rtol=1e-3)
        error = lambda kernel: sum(np.sum((x[0] @ kernel - x[l] @ w[l]) ** 2) for l in (0, 1))  # noqa: E731
        assert error(fitted[name].reshape(64, -1)) < min(error(w[0]), error(w.mean(axis=0)))


def test_config_only_retrofits(tmp_path, capsys):
    """Windows and a quantized cache change the config and the cache, not the parameters."""
    config, params = tiny_config(), random_params(tiny_config())
    source = write_source(tmp_path / "mha", config, params)
    convert_cli(["uptrain", "--src", str(source), "--sliding_window", "16", "--global_every", "2",
                  "--attention_sinks", "2", "--kv_cache_dtype", "int8", "--workdir", str(tmp_path / "out")])
    summary = capsys.readouterr().out
    loaded = mqa.load_model(tmp_path / "out")
    assert (loaded.model_config.sliding_window, loaded.model_config.global_every,
            loaded.model_config.attention_sinks, loaded.model_config.kv_cache_dtype) == (16, 2, 2, "int8")
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded.params, params))
    from mqa import accounting
    per_token = accounting.kv_cache_bytes_per_token(loaded.model_config)
    assert f"-> {per_token:,} bytes/token" in summary


def test_fewer_global_layers_keep_each_layers_rope_base(tmp_path, capsys):
    """A Gemma-like source (local layers on their own RoPE base) converted to all-local
    layers: with windows longer than the text nothing else changes, so the logits stay the
    source's only because layer 1 keeps its global base (`model.rope_global_every`)."""
    config = tiny_config("model.sliding_window=64", "model.global_every=2", "model.rope_local_theta=100")
    params = random_params(config)
    source = write_source(tmp_path / "gemma-like", config, params)
    convert_cli(["uptrain", "--src", str(source), "--global_every", "0", "--workdir", str(tmp_path / "out")])
    summary = capsys.readouterr().out
    assert "model.global_every=0; model.rope_global_every=2" in summary
    assert "K/V heads" not in summary  # a config-only conversion does not report heads kept
    converted = mqa.load_model(tmp_path / "out")
    assert converted.model_config.is_local(1) and converted.model_config.layer_rope_theta(1) == 10000.0
    np.testing.assert_allclose(converted(TOKENS), logits(config, params), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input




@pytest.fixture(scope="module")
def mha_source(tmp_path_factory) -> pathlib.Path:
    return write_source(tmp_path_factory.mktemp("src") / "mha", tiny_config(),
                        random_params(tiny_config()))


@pytest.mark.parametrize("num_kv_heads, named", [
    (3, "--num_kv_heads 3 does not divide the source's model.num_kv_heads=4; valid: 1, 2, 4"),
    (8, "--num_kv_heads 8 exceeds the source's model.num_kv_heads=4; valid: 1, 2, 4"),
    (0, "--num_kv_heads 0 must be >= 1"),
])
def test_bad_num_kv_heads_is_a_one_line_error(mha_source, tmp_path, capfd, num_kv_heads, named):
    message = uptrain_error(capfd, "--src", mha_source, "--num_kv_heads", num_kv_heads,
                            "--workdir", tmp_path / "out")
    assert named in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, named", [
    (["--num_kv_heads", 1, "--init", "aligned"], "needs calibration text: pass --text FILE"),
    (["--num_kv_heads", 1, "--init", "aligned", "--text", "missing.txt"], "--text file 'missing.txt' does not exist"),
    (["--kv_share_every", 3], "--kv_share_every 3 must be >= 2 and divide the source's model.num_layers=2; valid: 2"),
    (["--kv_share_every", 2, "--init", "random"], "--kv_share_every takes --init first, mean or aligned"),
    (["--sliding_window", 0, "--global_every", 2], "global_every"),
])
def test_bad_retrofit_is_a_one_line_error(mha_source, tmp_path, capfd, args, named):
    message = uptrain_error(capfd, "--src", mha_source, *args, "--workdir", tmp_path / "out")
    assert named in message
    assert not (tmp_path / "out").exists()


def test_aligning_normalised_keys_is_a_one_line_error(tmp_path, capfd):
    config = tiny_config("model.qk_norm=true")
    source = write_source(tmp_path / "gemma-like", config, random_params(config))
    assert "normalises keys (model.qk_norm)" in uptrain_error(
        capfd, "--src", source, "--num_kv_heads", 1, "--init", "aligned", "--workdir", tmp_path / "out")


def test_bad_src_or_workdir_is_a_one_line_error(mha_source, tmp_path, capfd):
    out = tmp_path / "out"
    assert "does not exist" in uptrain_error(capfd, "--src", tmp_path / "nope", "--num_kv_heads", 1,
                                             "--workdir", out)
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text(tiny_config().to_json())
    assert "has no checkpoint" in uptrain_error(capfd, "--src", tmp_path / "untrained", "--num_kv_heads",
                                                1, "--workdir", out)
    assert "no checkpoint at step 7" in uptrain_error(capfd, "--src", mha_source, "--num_kv_heads", 1,
                                                      "--workdir", out, "--step", 7)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("")
    assert "not empty" in uptrain_error(capfd, "--src", mha_source, "--num_kv_heads", 1, "--workdir", out)


# ----------------------------------------------------------------------------- train.init_from


def short_run(*overrides: str):
    """Two steps of an MQA tiny model, logging each."""
    return tiny_config("model.num_kv_heads=1", "train.steps=2", "train.log_every=1",
                       "train.eval_every=2", "train.eval_batches=1", *overrides)


@pytest.mark.slow
def test_training_starts_from_the_uptrained_params(mha_source, tmp_path, capsys):
    init = tmp_path / "mqa_init"
    converted = uptrain(mha_source, init, 1)
    config = short_run(f"train.init_from={init}")
    trainer.train(config, tmp_path / "run")
    assert f"initialised the parameters from step 0 of {init}" in capsys.readouterr().out

    corpus = data.load_corpus(config.data, tmp_path / "run" / "data", min_tokens=1)
    batch = data.train_batch(corpus.train, 0, seed=config.train.seed,
                             batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                             sampling=config.train.sampling)
    expected = float(np.mean(cross_entropy(converted(batch[:, :-1]), batch[:, 1:])))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[0]["step"] == 0 and "initial_eval_loss" in rows[0]  # the converted model
    rows = rows[1:]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["eval_loss"])

    # A resumed run continues from its own checkpoint and ignores init_from.
    trainer.train(short_run("train.steps=3", f"train.init_from={tmp_path / 'gone'}"), tmp_path / "run")
    assert "resumed from step 2" in capsys.readouterr().out


def numpy_kl(teacher_logits, logits) -> np.ndarray:
    """Per-token KL(teacher || model) in float64, written out."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    p, q = log_softmax(teacher_logits), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def test_distillation_loss_is_the_kl_to_the_teacher_mixed_with_the_lm_loss(mha_source, tmp_path):
    """train.distill_from: the first step's loss is w * KL(teacher || student) + (1 - w) *
    LM loss on its batch, both computed here from the two models' logits in float64."""
    init = tmp_path / "mqa_init"
    student = uptrain(mha_source, init, 1)
    teacher = mqa.load_model(mha_source)
    config = short_run(f"train.init_from={init}", f"train.distill_from={mha_source}",
                       "train.distill_weight=0.25")
    trainer.train(config, tmp_path / "run")
    corpus = data.load_corpus(config.data, tmp_path / "run" / "data", min_tokens=1)
    batch = data.train_batch(corpus.train, 0, seed=config.train.seed,
                             batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                             sampling=config.train.sampling)
    kl = float(np.mean(numpy_kl(teacher(batch[:, :-1]), student(batch[:, :-1]))))
    lm = float(np.mean(cross_entropy(student(batch[:, :-1]), batch[:, 1:])))
    assert kl > 0.01
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][1:]
    assert rows[0]["distill_kl"] == pytest.approx(kl, rel=1e-4)
    assert rows[0]["lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(0.25 * kl + 0.75 * lm, rel=1e-4)


def test_distilling_from_itself_has_no_gradient():
    """KL(p || q) has zero gradient at q = p: a model distilled from itself does not move."""
    from mqa.training import make_optimizer, make_train_step, TrainState, learning_rate_schedule
    config = short_run()
    model_config = build_model_config(config.model)
    graphdef, params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(config.train)
    step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(config.train),
                                   teacher=graphdef, distill_weight=1.0))
    state = TrainState(jax.numpy.zeros((), jax.numpy.int32), params, optimizer.init(params))
    _, metrics = step(state, jax.numpy.asarray(np.concatenate([TOKENS, TOKENS[:, :1]], 1)), params)
    assert float(metrics["distill_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["grad_norm"]) < 1e-5


def test_distilling_from_another_vocabulary_is_a_one_line_error(tmp_path):
    other = tiny_config("model.vocab_size=300")
    teacher = write_source(tmp_path / "teacher", other, random_params(other))
    with pytest.raises(ConfigError) as error:
        trainer.train(short_run(f"train.distill_from={teacher}"), tmp_path / "run")
    assert "has a vocabulary of 300 tokens, this model 256" in str(error.value)
    assert "\n" not in str(error.value)


def test_init_from_that_does_not_fit_is_a_one_line_error(mha_source, tmp_path):
    config = short_run(f"train.init_from={mha_source}")  # 4 K/V heads into a 1-head model
    with pytest.raises(ConfigError) as error:
        trainer.train(config, tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message and message.startswith("train.init_from: ")
    assert "blocks.attention.k of shape (2, 64, 4, 16), but the config gives (2, 64, 1, 16)" in message
    with pytest.raises(ConfigError, match="has no unembed, which the config needs"):
        trainer.train(short_run("model.tie_embeddings=false", f"train.init_from={mha_source}"),
                      tmp_path / "untied")


@pytest.mark.slow
def test_uptraining_from_the_command_line(tmp_path):
    """The README's flow, as subprocesses: train MHA, convert, uptrain MQA; and a bad one.
    (Compiled unoptimized: no number here is compared with another run's.)"""
    tiny = ["--config=configs/tiny.py", "--config.train.steps=4", "--config.train.log_every=1",
            "--config.train.eval_every=4", "--config.train.eval_batches=1"]
    run_train(tmp_path / "mha", *tiny, "--config.model.num_kv_heads=4", optimize=False)
    convert_cli(["uptrain", "--src", str(tmp_path / "mha"), "--num_kv_heads", "1",
                  "--workdir", str(tmp_path / "mqa_init")])
    result = run_train(tmp_path / "mqa_up", *tiny, "--config.model.num_kv_heads=1",
                       f"--config.train.init_from={tmp_path / 'mqa_init'}",
                       "--config.train.warmup_steps=1", optimize=False)
    assert "initialised the parameters from step 0" in result.stdout
    result = run_train(tmp_path / "gqa_up", *tiny, "--config.model.num_kv_heads=2",
                       f"--config.train.init_from={tmp_path / 'mqa_init'}", check=False)
    assert_one_line_error(result, "train.init_from", "blocks.attention.k", "(2, 64, 1, 16)",
                          "(2, 64, 2, 16)")


# ----------------------------------------------------------------------------- a pretrained tokenizer


@pytest.fixture(scope="module")
def bpe_source(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """An MHA source with its own 300-token BPE (as `mqa.convert gguf` or `hf-llama` leave a
    pretrained model), and a 20,000-character text to uptrain it on."""
    folder = tmp_path_factory.mktemp("bpe")
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:20_000]
    (folder / "text.txt").write_text(text)
    config = tiny_config("model.vocab_size=300")
    workdir = folder / "mha"
    write_workdir(workdir, config, random_params(config), tokenizer=None)
    data.BpeTokenizer.train(text[:5_000], 300).save(workdir)
    return workdir, folder / "text.txt"


@pytest.mark.slow
def test_uptraining_with_the_source_models_tokenizer(bpe_source, tmp_path, capsys):
    """data.tokenizer=init_from trains on the source's own tokens, and the run logs the
    converted model's held-out loss at step 0 (over the whole split) before training."""
    source, text = bpe_source
    converted = uptrain(source, tmp_path / "init", 1)
    run = tmp_path / "run"
    config = short_run("data.tokenizer=init_from", f"data.path={text}", "train.steps=1",
                       f"train.init_from={tmp_path / 'init'}")
    trainer.train(config, run)
    assert "model.vocab_size set to 300" in capsys.readouterr().out

    # The run's tokenizer is the source's, and its token cache holds that tokenizer's ids.
    assert (run / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    source_tokenizer = data.load_tokenizer(source)
    train_text, heldout_text = data.split_text(text.read_text(), config.data.heldout_fraction)
    corpus = data.load_corpus(data_config(config), run / "data", min_tokens=1)
    np.testing.assert_array_equal(corpus.train, source_tokenizer.encode(train_text))
    heldout = source_tokenizer.encode(heldout_text)
    np.testing.assert_array_equal(corpus.heldout, heldout)

    # Step 0: the converted model on every non-overlapping held-out window, computed here
    # straight from its logits.
    seq_len = config.train.seq_len
    count = (len(heldout) - 1) // seq_len
    windows = np.stack([heldout[i * seq_len: i * seq_len + seq_len + 1] for i in range(count)])
    expected = np.mean(np.asarray(cross_entropy(converted(windows[:, :-1]), windows[:, 1:])))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[0]["step"] == 0
    assert rows[0]["initial_eval_tokens"] == count * seq_len
    assert rows[0]["initial_eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert rows[-1]["step"] == 1 and "initial_eval_loss" not in rows[-1]


def test_bad_tokenizer_choice_is_a_one_line_error(bpe_source, tmp_path):
    source, text = bpe_source
    with pytest.raises(ConfigError, match="data.tokenizer='init_from' needs train.init_from"):
        trainer.train(short_run("data.tokenizer=init_from", f"data.path={text}"), tmp_path / "a")
    with pytest.raises(data.DataError) as error:
        trainer.train(short_run(f"data.tokenizer={tmp_path / 'nope'}", f"data.path={text}"),
                      tmp_path / "b")
    assert "\n" not in str(error.value)
    assert f"data.tokenizer='{tmp_path / 'nope'}' is neither one of 'byte', 'bpe' nor a " \
           "tokenizer.json file or a folder holding one" in str(error.value)
    # A tokenizer.json named directly works, as does the folder holding it.
    config = short_run(f"data.tokenizer={source / 'tokenizer.json'}", f"data.path={text}")
    corpus = data.load_corpus(config.data, tmp_path / "c", min_tokens=1)
    assert corpus.tokenizer.vocab_size == 300
