"""Random tiny sources for the uptrain tests (test_uptrain.py, test_convert_latent.py):
configs/tiny.py models written straight to workdirs, calibration text, and the command
line's one-line refusals."""

import pathlib

import jax
import numpy as np
from flax import nnx

from mqa import data
from mqa.config import build_model_config, load_config_file
from mqa.model import Transformer
from mqa.workdir import write_workdir
from commands import REPO, refusal

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


def calibration_text(tmp_path) -> pathlib.Path:
    path = tmp_path / "calibration.txt"
    rng = np.random.default_rng(5)
    words = ["the", "river", "trade", "north", "island", "of", "and", "capital", "coast", "war"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    return path


def uptrain_error(capfd, *args) -> str:
    """The one line `python -m mqa.convert uptrain ARGS` refuses with."""
    return refusal(capfd, "uptrain", *args)
