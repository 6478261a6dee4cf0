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
from mqa.config import ConfigError, ModelConfig, build_model_config, load_config_file
from mqa.convert.__main__ import main as convert_cli
from mqa.convert.uptrain import KV_PROJECTIONS
from mqa.model import Transformer
from mqa.training import cross_entropy
from mqa.workdir import data_config, params_by_name, write_workdir
from commands import REPO, assert_one_line_error, refusal, run_train

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

HEADS = 4  # configs/tiny.py: 4 query heads, d_model 64, head_dim 16, 2 layers
TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 32), dtype=np.int32)


def tiny_config(*overrides: str):
    """configs/tiny.py as MHA, with "section.field=value" overrides."""
    return load_config_file(REPO / "configs" / "tiny.py", [f"model.num_kv_heads={HEADS}", *overrides])


def random_params(config) -> nnx.State:
    """A freshly initialised Transformer's parameters; the norm scales, which start at ones
    and would hide a mix-up, made random too."""
    params = nnx.split(Transformer(build_model_config(config.model), rngs=nnx.Rngs(1)))[1]
    rng = np.random.default_rng(2)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if "scale" in jax.tree_util.keystr(path) else x, nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, pure)
    return params


def write_source(workdir: pathlib.Path, config, params: nnx.State) -> pathlib.Path:
    """A workdir like a training run leaves: config.json, checkpoints/0/params, tokenizer."""
    write_workdir(workdir, config, params, tokenizer=None)
    data.ByteTokenizer().save(workdir)
    return workdir


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


# ----------------------------------------------------------------------------- bad input


def uptrain_error(capfd, *args) -> str:
    """The one line `python -m mqa.convert uptrain ARGS` refuses with."""
    return refusal(capfd, "uptrain", *args)


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
    """The README's flow, as subprocesses: train MHA, convert, uptrain MQA; and a bad one."""
    tiny = ["--config=configs/tiny.py", "--config.train.steps=4", "--config.train.log_every=1",
            "--config.train.eval_every=4", "--config.train.eval_batches=1"]
    run_train(tmp_path / "mha", *tiny, "--config.model.num_kv_heads=4")
    convert_cli(["uptrain", "--src", str(tmp_path / "mha"), "--num_kv_heads", "1",
                  "--workdir", str(tmp_path / "mqa_init")])
    result = run_train(tmp_path / "mqa_up", *tiny, "--config.model.num_kv_heads=1",
                       f"--config.train.init_from={tmp_path / 'mqa_init'}",
                       "--config.train.warmup_steps=1")
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
