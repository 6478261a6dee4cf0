"""mqa.workdir: parameters by dotted name round-trip; a damaged checkpoint is named with the
error that reading it gave, moved aside by training and left in place by loading.

Workdirs are tiny random models written straight to disk (no training run)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mqa
from model_files import damage
from mqa.checkpoint import Checkpointer, abstract_like
from mqa.config import build_model_config, ConfigError, ModelConfig, load_config_file
from mqa.model import Transformer
from mqa.training import TrainState
from mqa.workdir import (CheckpointError, check_new_workdir, damage_reason, params_by_name,
                         params_from_names, restore_newest_intact, write_workdir)

REPO = pathlib.Path(__file__).resolve().parents[1]
# What reading a damaged checkpoint must not print instead of the error (orbax's wrapper).
UNINFORMATIVE = ("bound method", "pybind11", "tensorstore_spec")


# orbax's reads still pending when a damaged read failed complain when they are collected.
quiet_orbax = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# What the storage layer says, for each kind of damage: it names the file and the fault.
REASONS = {"truncated": ("OUT_OF_RANGE", "Requested byte range"),
           "missing": ("NOT_FOUND", "does not exist")}


def assert_informative(line: str, how: str) -> None:
    for fragment in REASONS[how]:
        assert fragment in line, line
    for fragment in UNINFORMATIVE:
        assert fragment not in line, line


def tiny(tmp_path):
    config = load_config_file(REPO / "configs" / "tiny.py", ["model.num_layers=1"])
    model_config = build_model_config(config.model)
    params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)))[1]
    return config, model_config, params


def test_params_by_name_round_trips(tmp_path):
    _, model_config, params = tiny(tmp_path)
    arrays = params_by_name(params)
    assert arrays["blocks.attention.k"].shape == (1, 64, 2, 16)  # [layers, m, kv_heads, d]
    back = params_from_names(model_config, arrays)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    with pytest.raises(ValueError, match="parameter blocks.attention.k has shape"):
        params_from_names(model_config, {**arrays, "blocks.attention.k": arrays["blocks.attention.q"]})


def test_a_new_workdir_must_be_empty(tmp_path):
    check_new_workdir(tmp_path / "new")
    check_new_workdir(tmp_path)
    (tmp_path / "x").write_text("x")
    with pytest.raises(ConfigError, match="--out .* is not empty"):
        check_new_workdir(tmp_path, "--out")


@quiet_orbax
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_loading_skips_a_damaged_checkpoint_and_names_the_error(tmp_path, capfd, how):
    config, model_config, params = tiny(tmp_path)
    write_workdir(tmp_path, config, params, tokenizer=None)
    other = jax.tree.map(lambda x: x + 1, params)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    checkpoints.save_params(5, other)
    checkpoints.close()
    damage(tmp_path / "checkpoints" / "5", how)

    capfd.readouterr()
    loaded = mqa.load_model(tmp_path)
    warning = capfd.readouterr().err
    assert loaded.step == 0 and jax.tree.all(jax.tree.map(np.array_equal, loaded.params, params))
    assert warning.startswith("warning: checkpoint step 5 in") and len(warning.splitlines()) == 1
    assert "skipped it (left in place)" in warning
    assert_informative(warning, how)
    assert (tmp_path / "checkpoints" / "5").is_dir()  # loading never changes a workdir
    assert not (tmp_path / "damaged_checkpoints").exists()

    with pytest.raises(CheckpointError) as error:
        mqa.load_model(tmp_path, step=5)
    assert "checkpoint step 5" in str(error.value) and "is damaged" in str(error.value)
    assert_informative(str(error.value), how)


@quiet_orbax
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_training_moves_a_damaged_checkpoint_aside_and_names_the_error(tmp_path, capfd, how):
    _, _, params = tiny(tmp_path)
    optimizer = optax.adam(1e-3)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    for step in (1, 2):
        checkpoints.save(TrainState(jnp.array(step, jnp.int32), params, optimizer.init(params)))
        checkpoints.wait()
    damage(tmp_path / "checkpoints" / "2", how)

    capfd.readouterr()
    abstract = abstract_like(TrainState(jnp.array(0, jnp.int32), params, optimizer.init(params)))
    state, step = restore_newest_intact(checkpoints, abstract, move_damaged=True)
    warning = capfd.readouterr().err
    checkpoints.close()
    assert step == int(state.step) == 1
    assert warning.startswith("warning: checkpoint step 2 in") and len(warning.splitlines()) == 1
    assert "moved it to" in warning and "damaged_checkpoints" in warning
    assert_informative(warning, how)
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["2"]
    assert not (tmp_path / "checkpoints" / "2").exists()


def test_damage_reason_is_the_innermost_cause_in_one_line():
    try:
        try:
            raise ValueError('OUT_OF_RANGE: Error reading "x"\n in file [tensorstore_spec=\'{...}\']')
        except ValueError as inner:
            raise Exception("See full TensorStore details: <bound method spec of ...>") from inner
    except Exception as error:
        assert damage_reason(error) == 'OUT_OF_RANGE: Error reading "x" in file'
