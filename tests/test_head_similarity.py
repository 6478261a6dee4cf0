"""Head similarity: attention patterns against a float64 reference, Jensen-Shannon against
scipy, optimal grouping, and that reordering heads leaves the model's function unchanged."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
import scipy.spatial.distance
from flax import nnx

from helpers import make
from mqa import head_similarity as hs
from mqa.config import build_model_config
from mqa.workdir import params_by_name, params_from_names
from reference import rope

pytestmark = pytest.mark.usefixtures("fast_compile")

BASE = build_model_config(vocab_size=61, d_model=48, num_layers=4, num_heads=6, num_kv_heads=6,
                          head_dim=8, mlp_dim=64, max_seq_len=64)


def random_model(config, seed=0):
    model = make(seed, config=config)
    # Larger query/key weights than at initialisation, so the heads attend differently.
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda a: a * 3 if a.ndim == 4 else a, params)
    return nnx.merge(graphdef, params)


def reference_probs(model, tokens):
    """Each layer's attention probabilities, float64, written layer by layer and head by
    head from the raw weights (no code shared with mqa)."""
    config = model.config
    arrays = {k: np.asarray(v, np.float64) for k, v in params_by_name(nnx.state(model)).items()}
    norm = lambda x, s: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * s  # noqa: E731
    x = arrays["embed"][tokens]
    t = tokens.shape[1]
    positions, s = np.arange(t), config.kv_share_every
    group = config.num_heads // config.num_kv_heads
    out = []
    for i in range(config.num_layers):
        prefix, index = ("blocks", i // s) if i % s == 0 else ("shared_blocks", i // s * (s - 1) + i % s - 1)
        w = {name: arrays[f"{prefix}.{name}"][index] for name in (
            "attention_norm.scale", "attention.q", "attention.out", "mlp_norm.scale",
            "mlp.gate", "mlp.up", "mlp.down")}
        h = norm(x, w["attention_norm.scale"])
        q = rope(np.einsum("btm,mhd->bthd", h, w["attention.q"]), positions, config.rope_theta)
        if i % s == 0:
            k = rope(np.einsum("btm,mkd->btkd", h, arrays["blocks.attention.k"][i // s]),
                     positions, config.rope_theta)
            v = np.einsum("btm,mkd->btkd", h, arrays["blocks.attention.v"][i // s])
        probs = np.zeros((tokens.shape[0], config.num_heads, t, t))
        heads_out = np.zeros_like(q)
        for head in range(config.num_heads):
            logits = q[:, :, head] @ np.swapaxes(k[:, :, head // group], 1, 2) / np.sqrt(config.head_dim)
            logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            probs[:, head] = p / p.sum(-1, keepdims=True)
            heads_out[:, :, head] = probs[:, head] @ v[:, :, head // group]
        out.append(probs)
        x = x + np.einsum("bthd,hdm->btm", heads_out, w["attention.out"])
        h = norm(x, w["mlp_norm.scale"])
        gate, up = h @ w["mlp.gate"], h @ w["mlp.up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp.down"]
    return out


@pytest.mark.parametrize("kv_heads,share", [(6, 1), (3, 1), (2, 2)])
def test_attention_probs_match_a_float64_reference(kv_heads, share):
    config = dataclasses.replace(BASE, num_kv_heads=kv_heads, kv_share_every=share)
    model = random_model(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    got = list(hs.layer_attention_probs(model, tokens))
    want = reference_probs(model, tokens)
    assert len(got) == config.num_layers
    for layer, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"layer {layer}")


def test_js_divergence_is_scipys():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7), size=(2, 4, 5))  # [batch 2, heads 4, t 5, s 7]
    probs[0, 1, 0] = [1, 0, 0, 0, 0, 0, 0]             # zeros are allowed
    matrix = hs.js_divergence_matrix(probs)
    for i, j in itertools.combinations(range(4), 2):
        expected = np.mean([scipy.spatial.distance.jensenshannon(probs[b, i, t], probs[b, j, t],
                                                                 base=2) ** 2
                            for b in range(2) for t in range(5)])
        assert matrix[i, j] == pytest.approx(expected, abs=1e-12)
        assert matrix[j, i] == matrix[i, j]
    assert np.all(np.diag(matrix) == 0) and np.all((matrix >= 0) & (matrix <= 1))


def test_similarity_groups_find_planted_pairs_and_are_optimal():
    rng = np.random.default_rng(2)
    divergence = rng.uniform(0.5, 1.0, (8, 8))
    divergence = (divergence + divergence.T) / 2
    np.fill_diagonal(divergence, 0)
    planted = [(0, 5), (1, 3), (2, 7), (4, 6)]
    for i, j in planted:
        divergence[i, j] = divergence[j, i] = 0.01
    assert hs.similarity_groups(divergence, 4) == planted
    # Exhaustive: no partition of 6 heads into 3 pairs or 2 triples does better.
    small = divergence[:6, :6]
    for size in (2, 3):
        best = hs.similarity_groups(small, 6 // size)
        every = [[tuple(sorted(g)) for g in p] for p in _all_partitions(list(range(6)), size)]
        assert len(every) == {2: 15, 3: 10}[size]
        assert hs.within_group_cost(small, best) == pytest.approx(
            min(hs.within_group_cost(small, p) for p in every))
    # The greedy path (too many partitions to enumerate) still gives a valid partition.
    greedy = hs.similarity_groups(divergence, 4, exhaustive_limit=1)
    assert sorted(h for g in greedy for h in g) == list(range(8)) and greedy == planted


def _all_partitions(items, size):
    """Every set partition of items into groups of `size`, written out independently."""
    if not items:
        return [[]]
    result = []
    for combo in itertools.combinations(items[1:], size - 1):
        rest = [i for i in items[1:] if i not in combo]
        for tail in _all_partitions(rest, size):
            result.append([(items[0], *combo), *tail])
    return result


@pytest.mark.parametrize("kv_heads,share", [(6, 1), (3, 1), (3, 2)])
def test_permuting_heads_leaves_the_function_unchanged(kv_heads, share):
    config = dataclasses.replace(BASE, num_kv_heads=kv_heads, kv_share_every=share)
    model = random_model(config)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 16))
    rng = np.random.default_rng(4)
    orders = [list(rng.permutation(kv_heads)) for _ in range(config.num_kv_layers)]
    assert any(order != sorted(order) for order in orders)
    arrays = params_by_name(nnx.state(model))
    permuted = hs.permute_heads(arrays, config, orders)
    assert not np.array_equal(permuted["blocks.attention.k"], arrays["blocks.attention.k"])
    other = nnx.merge(nnx.graphdef(model), params_from_names(config, permuted))
    np.testing.assert_allclose(np.asarray(other(tokens)), np.asarray(model(tokens)),
                               rtol=1e-5, atol=1e-5)
    # And the permuted heads really moved: head orders[g][0]'s keys are now head 0's.
    g0 = orders[0]
    np.testing.assert_array_equal(permuted["blocks.attention.k"][0][:, 0],
                                  arrays["blocks.attention.k"][0][:, g0[0]])


def test_analysis_of_a_model_with_duplicated_heads_finds_them():
    """Heads 0 and 4 (and 2 and 5) given identical query and key weights attend
    identically: divergence 0, cosine 1, and grouping pairs them."""
    model = random_model(BASE)
    arrays = params_by_name(nnx.state(model))
    for name in ("blocks.attention.q", "blocks.attention.k", "blocks.attention.v"):
        a = arrays[name].copy()
        a[:, :, 4], a[:, :, 5] = a[:, :, 0], a[:, :, 2]
        arrays[name] = a
    model = nnx.merge(nnx.graphdef(model), params_from_names(BASE, arrays))
    tokens = np.random.default_rng(5).integers(0, BASE.vocab_size, (2, 16))
    layers = hs.analyse(model, tokens)
    for layer in layers:
        assert layer["query_js"][0, 4] == pytest.approx(0, abs=1e-9)
        assert layer["key_cosine"][2, 5] == pytest.approx(1.0)
        assert layer["query_js"][0, 1] > 1e-3
    orders = hs.kv_group_orders(layers, BASE, 3)
    for order in orders:
        pairs = {tuple(sorted(order[i:i + 2])) for i in (0, 2, 4)}
        assert (0, 4) in pairs and (2, 5) in pairs


def test_heads_command(tmp_path, capsys, monkeypatch):
    """`python -m mqa.analysis heads` (its `main`, in this process) on a workdir's held-out
    split: a table row per layer, heads.json with every matrix, a heatmap per layer; a
    missing --text file is one line naming it."""
    import json

    from helpers import REPO
    from mqa import analysis
    from mqa.config import load_config_file
    from mqa.workdir import write_workdir

    run = tmp_path / "run"
    config = load_config_file(REPO / "configs" / "tiny.py", ["model.num_kv_heads=4"])
    write_workdir(run, config, nnx.state(make(config=build_model_config(config.model)), nnx.Param),
                  tokenizer=None)
    analysis.main(["heads", f"--workdir={run}", "--windows=2", "--seq_len=32"])
    table = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and "layer" not in line]
    assert len(table) == 2  # one row per layer of configs/tiny.py
    saved = json.loads((run / "analysis" / "heads.json").read_text())
    assert saved["windows"] == 2 and saved["seq_len"] == 32 and len(saved["layers"]) == 2
    assert np.asarray(saved["layers"][0]["query_js"]).shape == (4, 4)
    assert all((run / "analysis" / f"heads_layer{i}.png").read_bytes()[:4] == b"\x89PNG"
               for i in range(2))

    def fail(message):  # mqa.cli.fail prints the line and ends the process
        raise SystemExit(message)

    monkeypatch.setattr(analysis, "fail", fail)
    with pytest.raises(SystemExit) as error:
        analysis.main(["heads", f"--workdir={run}", f"--text={tmp_path / 'missing.txt'}"])
    assert "missing.txt" in str(error.value) and "does not exist" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_analysis_command_refuses_in_one_line(tmp_path):
    """`python -m mqa.analysis` itself: a bad flag and a missing workdir are one line on
    stderr and exit status 2, no usage text and no traceback."""
    import subprocess
    import sys

    from commands import REPO, assert_one_line_error
    run = lambda *args: subprocess.run([sys.executable, "-m", "mqa.analysis", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    flag = run("heads", f"--workdir={tmp_path}", "--windws=2")
    assert_one_line_error(flag, "unrecognized arguments: --windws=2")
    assert len(flag.stderr.strip().splitlines()) == 1
    missing = run("heads", f"--workdir={tmp_path / 'nope'}")
    assert_one_line_error(missing, str(tmp_path / "nope"), "does not exist")
