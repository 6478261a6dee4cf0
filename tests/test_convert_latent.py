"""Grouped attention converted to latent attention (`mqa.convert uptrain --attention latent`,
`mqa.convert.latent`): exact where nothing is dropped, the best rank-C latent where the
latent is smaller, and one-line errors for what it cannot take."""

import numpy as np
import pytest

import mqa
from mqa import accounting
from mqa.convert import calibration
from mqa.convert.__main__ import main as convert_cli
from mqa.workdir import params_by_name, params_from_names
from mqa.config import build_model_config
from uptrain_sources import TOKENS, calibration_text, random_params, tiny_config, uptrain_error, write_source

pytestmark = pytest.mark.usefixtures("fast_compile")

D, KV = 16, 2  # configs/tiny.py's head_dim; a GQA source with 2 K/V heads for 4 query heads


def source(tmp_path, *overrides, zero_dropped_pairs_of=0):
    """A random GQA-2 tiny model written as a workdir; with zero_dropped_pairs_of P, its
    keys' rotary pairs beyond the P/2 highest frequencies are zero (so that they carry
    nothing a conversion could lose)."""
    config = tiny_config(f"model.num_kv_heads={KV}", *overrides)
    params = random_params(config)
    if zero_dropped_pairs_of:
        arrays = {name: np.array(a) for name, a in params_by_name(params).items()}
        rotary = config.model.rope_head_dim or D
        first, half, keep = D - rotary, rotary // 2, zero_dropped_pairs_of // 2
        dropped = [first + i for i in range(keep, half)] + [first + half + i for i in range(keep, half)]
        arrays["blocks.attention.k"][..., dropped] = 0
        params = params_from_names(build_model_config(config.model), arrays)
    return write_source(tmp_path / "src", config, params)


def convert(src, out, text, *args) -> mqa.LoadedModel:
    convert_cli(["uptrain", "--src", str(src), "--workdir", str(out), "--attention", "latent",
                 "--text", str(text), *map(str, args)])
    return mqa.load_model(out)


@pytest.mark.parametrize("overrides, rope, latent, zeroed", [
    ((), D, KV * D, 0),                                    # whole-head RoPE, every pair kept
    (("model.rope_head_dim=8",), 8, KV * (2 * D - 8), 0),  # partial RoPE: its nope dims in the latent
    (("model.attention_score_dim=12",), D, KV * D, 0),     # Gemma's score scale folded into q
    ((), 4, KV * (2 * D - 4), 4),                          # 2 of 8 pairs kept; the others carry nothing
    (("model.rope_head_dim=8",), 4, KV * (2 * D - 4), 4),  # 2 of 4 pairs of a partial rotary part
], ids=["full", "partial-source", "score-dim", "kept-high", "partial-kept-high"])
def test_conversion_with_nothing_dropped_keeps_the_logits(tmp_path, capsys, overrides, rope, latent, zeroed):
    src = source(tmp_path, *overrides, zero_dropped_pairs_of=zeroed)
    before = mqa.load_model(src)
    after = convert(src, tmp_path / "mla", calibration_text(tmp_path), "--kv_latent_dim", latent,
                    "--rope_head_dim", rope)
    summary = capsys.readouterr().out
    c = after.model_config
    assert (c.attention, c.kv_latent_dim, c.rope_head_dim, c.rope_key_heads, c.kv_latent_norm) == (
        "latent", latent, rope, KV, False)
    rotary = before.model_config.rope_head_dim or D
    assert c.rope_frequency_dim == (rotary if rope < rotary else 0)
    assert c.qk_nope_dim == (D - rope if rope < D else 0)  # each score's d numbers, split; no zeros
    np.testing.assert_allclose(after(TOKENS), before(TOKENS), atol=1e-4, rtol=0)
    if not zeroed:  # every pair kept and C = n: the latent holds all of it
        assert "100.0% of the rotary 2-norm contribution" in summary and "(100.0% of their" in summary
    if rope == rotary == D:  # whole heads: the cache is the source's size
        assert accounting.kv_cache_bytes(c, 1, 64) == accounting.kv_cache_bytes(before.model_config, 1, 64)
    if not overrides and not zeroed:  # cached decoding too (once: it compiles the token loop)
        np.testing.assert_array_equal(*[mqa.generate(m, TOKENS[:1, :8], 6) for m in (before, after)])


def test_each_head_keeps_the_pairs_that_contribute_most(tmp_path, capsys):
    """--rope_pairs contribution (MHA2MLA's 2-norm strategy): K/V head 0's keys rotate only
    in pairs 5 and 7, head 1's only in 0 and 2 (layer 0; reversed in layer 1), so those are
    the pairs each head keeps, each turning at its own frequencies (`model.rope_pairs`),
    and the conversion is exact; the highest frequencies (pairs 0 and 1) lose head 0's
    scores. The summary's kept share is MHA2MLA's measure computed directly."""
    config = tiny_config(f"model.num_kv_heads={KV}")
    arrays = {name: np.array(a) for name, a in params_by_name(random_params(config)).items()}
    half, live = D // 2, {0: ([5, 7], [0, 2]), 1: ([0, 2], [5, 7])}  # layer: each head's pairs
    for layer, heads in live.items():
        for head, pairs in enumerate(heads):
            dead = [i for i in range(half) if i not in pairs]
            arrays["blocks.attention.k"][layer, :, head, dead + [half + i for i in dead]] = 0
    src = write_source(tmp_path / "src", config, params_from_names(build_model_config(config.model), arrays))
    before, text = mqa.load_model(src), calibration_text(tmp_path)
    args = ("--kv_latent_dim", KV * (2 * D - 4), "--rope_head_dim", 4)
    after = convert(src, tmp_path / "mla", text, *args, "--rope_pairs", "contribution")
    assert "(the pairs contributing most; 100.0% of the rotary 2-norm contribution)" in capsys.readouterr().out
    assert after.model_config.rope_pairs == (5, 7, 0, 2, 0, 2, 5, 7)
    np.testing.assert_allclose(after(TOKENS), before(TOKENS), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(*[mqa.generate(m, TOKENS[:1, :8], 6) for m in (before, after)])

    high = convert(src, tmp_path / "high", text, *args, "--rope_pairs", "high")
    assert high.model_config.rope_pairs == ()
    assert np.abs(high(TOKENS) - before(TOKENS)).max() > 1e-2
    # the kept share, directly: per pair, |q rows| |k rows| summed over a K/V head's query heads
    x = calibration.attention_inputs(before, calibration.calibration_tokens(before, text)).astype(np.float64)
    shares = []
    for layer in range(2):
        q = np.einsum("nm,mhd->nhd", x[layer], arrays["blocks.attention.q"][layer])
        k = np.einsum("nm,mkd->nkd", x[layer], arrays["blocks.attention.k"][layer])
        score = np.array([[sum(np.linalg.norm(q[:, h, [i, half + i]]) * np.linalg.norm(k[:, h // 2, [i, half + i]])
                               for h in range(2 * j, 2 * j + 2)) for i in range(half)] for j in range(KV)])
        shares.append(score[:, :2].sum() / score.sum())
    assert f"(the highest frequencies; {100 * np.mean(shares):.1f}% of the rotary 2-norm" in capsys.readouterr().out


@pytest.mark.parametrize("kv", [1, 2], ids=["MQA", "GQA-2-proportional"])
def test_one_shared_rotary_key_is_exact_where_the_heads_agree(tmp_path, capsys, kv):
    """--rope_keys mixed (TransMLA's RoRoPE): for an MQA source, or K/V heads whose keys are
    multiples of one another (rank one per frequency), the mixed key holds all of it."""
    config = tiny_config(f"model.num_kv_heads={kv}")
    arrays = {name: np.array(a) for name, a in params_by_name(random_params(config)).items()}
    arrays["blocks.attention.k"][:, :, -1] = -0.5 * arrays["blocks.attention.k"][:, :, 0]
    params = params_from_names(build_model_config(config.model), arrays)
    src = write_source(tmp_path / "src", config, params)
    after = convert(src, tmp_path / "mla", calibration_text(tmp_path), "--kv_latent_dim", 2 * kv * D,
                    "--rope_head_dim", D, "--rope_keys", "mixed")
    assert "holding 100.0% of the kept pairs' key energy" in capsys.readouterr().out
    assert (after.model_config.rope_key_heads, after.model_config.kv_latent_dim) == (1, 2 * kv * D)
    np.testing.assert_allclose(after(TOKENS), mqa.load_model(src)(TOKENS), atol=1e-4, rtol=0)
    assert accounting.kv_cache_bytes_per_token(after.model_config) == 2 * 4 * (2 * kv * D + D)


def test_a_smaller_latent_is_the_best_rank_c_fit_of_the_calibration_rows(tmp_path, capsys):
    """The dropped key dimensions and the values, as the latent reconstructs them on the
    calibration inputs, equal the truncated SVD of those rows (numpy, float64)."""
    c, rope = 12, 4
    src = source(tmp_path)
    text = calibration_text(tmp_path)
    after = convert(src, tmp_path / "mla", text, "--kv_latent_dim", c, "--rope_head_dim", rope)
    loaded = mqa.load_model(src)
    x = calibration.attention_inputs(loaded, calibration.calibration_tokens(loaded, text)).astype(np.float64)
    s, a = params_by_name(loaded.params), params_by_name(after.params)
    dropped = [i for i in range(D) if i not in (0, 1, 8, 9)]  # kept: pairs 0 and 1 (0/8, 1/9)
    energies = []
    for layer in range(2):
        k = s["blocks.attention.k"][layer].astype(np.float64)
        v = s["blocks.attention.v"][layer].astype(np.float64)
        rows = x[layer] @ np.concatenate([k[:, :, dropped].reshape(64, -1), v.reshape(64, -1)], 1)
        u, sv, vt = np.linalg.svd(rows, full_matrices=False)
        best = (u[:, :c] * sv[:c]) @ vt[:c]
        energies.append(np.sum(sv[:c] ** 2) / np.sum(sv ** 2))
        latent = x[layer] @ a["blocks.attention.kv_down"][layer]
        # query head 2h reads K/V head h: its k_up's first 12 dims and v_up give that head's rows
        keys = [latent @ a["blocks.attention.k_up"][layer][:, 2 * h, :D - rope] for h in range(KV)]
        values = [latent @ a["blocks.attention.v_up"][layer][:, 2 * h] for h in range(KV)]
        np.testing.assert_allclose(np.concatenate(keys + values, 1), best, atol=2e-4 * np.abs(best).max())
        assert np.all(a["blocks.attention.k_up"][layer][:, :, D - rope:] == 0)
        np.testing.assert_array_equal(a["blocks.attention.k_rope"][layer].reshape(64, KV, rope),
                                      s["blocks.attention.k"][layer][:, :, [0, 1, 8, 9]])
    assert f"({100 * np.mean(energies):.1f}% of their calibration energy)" in capsys.readouterr().out
    assert accounting.kv_cache_bytes_per_token(after.model_config) == 2 * 4 * (c + KV * rope)


@pytest.mark.parametrize("args, named", [
    (["--attention", "latent", "--kv_latent_dim", 8], "needs calibration text: pass --text FILE"),
    (["--attention", "latent", "--text", "t.txt"], "--attention latent needs --kv_latent_dim >= 1"),
    (["--attention", "latent", "--kv_latent_dim", 8, "--rope_head_dim", 3],
     "--rope_head_dim 3 must be even and in 2..16"),
    (["--attention", "latent", "--kv_latent_dim", 8, "--num_kv_heads", 1],
     "--attention latent does not combine with --num_kv_heads"),
    (["--kv_latent_dim", 8], "--kv_latent_dim, --rope_head_dim, --rope_keys and --rope_pairs are for --attention latent"),
    (["--attention", "latent", "--kv_latent_dim", 8, "--kv_cache_dtype", "int4"],
     "model.kv_cache_dtype='int4' is for model.attention='grouped'"),
])
def test_bad_latent_conversion_is_a_one_line_error(tmp_path, capfd, args, named):
    src = source(tmp_path)
    message = uptrain_error(capfd, "--src", src, *args, "--workdir", tmp_path / "out")
    assert named in message
    assert not (tmp_path / "out").exists()


def test_normalised_keys_cannot_be_converted(tmp_path, capfd):
    src = source(tmp_path, "model.qk_norm=true")
    assert "normalises keys (model.qk_norm), which a linear latent cannot hold" in uptrain_error(
        capfd, "--src", src, "--attention", "latent", "--kv_latent_dim", 8, "--text",
        calibration_text(tmp_path), "--workdir", tmp_path / "out")
