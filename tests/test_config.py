"""Config files load, and every invalid value fails with one line naming it."""

import pathlib

import ml_collections
import pytest

from mqa import accounting
from mqa.config import ConfigError, build_model_config, load_config_file, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def default(*overrides):
    return load_config_file(CONFIGS / "default.py", overrides)


@pytest.mark.parametrize("name,kv_heads", [("mha", 8), ("gqa", 2), ("mqa", 1), ("default", 8)])
def test_configs_load_and_set_kv_heads(name, kv_heads):
    config = load_config_file(CONFIGS / f"{name}.py")
    assert config.model.num_kv_heads == kv_heads
    assert config.model.num_heads == 8


def test_tiny_config_is_small():
    model = build_model_config(load_config_file(CONFIGS / "tiny.py").model)
    assert accounting.param_count(model) < 200_000


def test_override_applies_with_the_fields_type():
    config = default("model.num_kv_heads=2", "train.learning_rate=3e-4", "model.remat=true")
    assert config.model.num_kv_heads == 2 and isinstance(config.model.num_kv_heads, int)
    assert config.train.learning_rate == 3e-4
    assert config.model.remat is True


def expect_error(match, *overrides, config=None):
    with pytest.raises(ConfigError, match=match) as info:
        if config is None:
            default(*overrides)
        else:
            validate(config)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_kv_heads_must_divide_heads():
    message = expect_error(r"model\.num_kv_heads=3 must divide model\.num_heads=8",
                           "model.num_kv_heads=3")
    assert message.endswith("valid: 1, 2, 4, 8")


@pytest.mark.parametrize("field", ["model.d_model", "model.num_layers", "model.num_heads",
                                   "model.num_kv_heads", "model.mlp_dim", "model.vocab_size",
                                   "train.steps", "train.batch_size", "train.seq_len",
                                   "checkpoint.keep"])
@pytest.mark.parametrize("value", [0, -2])
def test_sizes_must_be_positive(field, value):
    expect_error(rf"{field.replace('.', '[.]')}={value} must be >= 1", f"{field}={value}")


def test_head_sizes_need_not_add_up_to_d_model():
    """The projections q [m, h, d] and out [h, d, m] take any head_dim (Gemma 3 270M:
    4 x 256 against d_model 640); tests/test_gemma_model.py runs such a model."""
    config = load_config_file(CONFIGS / "default.py", ["model.head_dim=16"])
    assert config.model.num_heads * config.model.head_dim == 128 != config.model.d_model


def test_head_dim_must_be_even_for_rope():
    expect_error(r"model\.head_dim=3 must be even",
                 "model.d_model=24", "model.head_dim=3", "model.mlp_dim=64")


def test_unknown_key_in_override():
    expect_error(r"unknown config key 'model\.num_kv_head' \(did you mean 'num_kv_heads'\?\)",
                 "model.num_kv_head=2")


def test_unknown_key_in_config_file():
    config = default()
    config.train.learnin_rate = 0.1
    expect_error(r"unknown config key 'train\.learnin_rate' \(did you mean 'learning_rate'\?\)",
                 config=config)


def test_unknown_section():
    config = default()
    config.optimizer = ml_collections.ConfigDict({"lr": 1.0})
    expect_error(r"unknown config key 'optimizer'", config=config)


def test_wrong_type_read_back_from_json():
    values = default().to_dict()  # as a workdir's config.json is read back
    values["model"]["num_heads"] = "eight"
    expect_error(r"model\.num_heads='eight' has type str; expected int",
                 config=ml_collections.ConfigDict(values))


def test_wrong_type_in_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from configs import default\n"
                    "def get_config():\n"
                    "    config = default.get_config()\n"
                    "    config.model.num_heads = 'eight'\n"
                    "    return config\n")
    with pytest.raises(ConfigError, match=r"bad\.py: .*'num_heads'.*eight") as info:
        load_config_file(path)
    assert "\n" not in str(info.value)


def test_wrong_type_in_override():
    expect_error(r"model\.num_heads='eight' must be int", "model.num_heads=eight")


@pytest.mark.parametrize("field,value,valid", [
    ("model.attention_impl", "flash", "'einsum', 'tiled', 'blockwise', 'xla', 'cudnn'"),
    ("model.dtype", "float16", "'float32', 'bfloat16'"),
    ("model.attention", "sparse", "'grouped', 'tied', 'latent'"),
    ("model.kv_cache_dtype", "int2", "'', 'int8', 'int4'"),
])
def test_choices(field, value, valid):
    expect_error(rf"{field.replace('.', '[.]')}='{value}' is not one of: {valid}", f"{field}={value}")


def test_sequence_longer_than_model_supports():
    expect_error(r"train\.seq_len=2048 exceeds model\.max_seq_len=1024", "train.seq_len=2048")


def test_heldout_fraction_range():
    expect_error(r"data\.heldout_fraction=1\.5 must be in \(0, 1\)", "data.heldout_fraction=1.5")


def test_mesh_sizes():
    expect_error(r"mesh\.tensor=0 must be >= 1, or -1", "mesh.tensor=0")
    expect_error(r"at most one mesh axis may be -1", "mesh.tensor=-1")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.py' does not exist"):
        load_config_file("nope.py")


def test_malformed_override():
    with pytest.raises(ConfigError, match="override 'model.num_heads' must look like"):
        default("model.num_heads")
