"""Self-tests of the float64 NumPy references in tests/reference.py: properties that must
hold, checked on tiny shapes with NumPy only (no JAX, well under a second or two)."""

import numpy as np
import pytest

from reference import (attention_loops, family_layers, grouped_loops, int8_round_trip,
                             is_local_layer, latent_absorbed_loops, latent_loops, rope,
                             tied_loops, transformer_loops)

VOCAB, M, H, D, MLP, SEQ = 11, 16, 4, 8, 24, 9
THETA = 10000.0
SIZES = {"grouped": {}, "tied": {}, "latent": {"c": 6}}


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def model(attention, *, num_layers=2, kv=2, seed=0, **sizes):
    rng = np.random.default_rng(seed)
    layers = family_layers(rng, attention, num_layers, M, H, kv, D, MLP,
                           **{**SIZES[attention], **sizes})
    return layers, rng.standard_normal((VOCAB, M)), rng.uniform(0.5, 1.5, M)


def tokens(seed=1, batch=2, seq=SEQ):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


def normed_input(seed=2, batch=2, seq=SEQ, m=M):
    x = np.random.default_rng(seed).standard_normal((batch, seq, m))
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5)


def partial_rope(x, n):
    """Rope on x[..., n:] only, x: [batch, seq, heads, dim]."""
    positions = np.arange(x.shape[1])
    return np.concatenate([x[..., :n], rope(x[..., n:], positions, THETA)], -1)


def original_transformer_loops(layers, embed, final_scale, tokens, *, kv_share_every=1,
                               theta=10000.0, eps=1e-5):
    """transformer_loops as it was before the families: the grouped model must not change."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    norm = lambda x, scale: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * f64(scale)  # noqa: E731
    x = f64(embed)[np.asarray(tokens)]
    positions = np.arange(x.shape[1])
    for i, layer in enumerate(layers):
        h = norm(x, layer["attention_norm"])
        q = rope(np.einsum("btm,mhd->bthd", h, f64(layer["q"])), positions, theta)
        if i % kv_share_every == 0:
            k = rope(np.einsum("btm,mkd->btkd", h, f64(layer["k"])), positions, theta)
            v = np.einsum("btm,mkd->btkd", h, f64(layer["v"]))
        x = x + np.einsum("bthd,hdm->btm", attention_loops(q, k, v), f64(layer["out"]))
        h = norm(x, layer["mlp_norm"])
        gate, up = h @ f64(layer["gate"]), h @ f64(layer["up"])
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(layer["down"])
    return norm(x, final_scale) @ f64(embed).T


# --- family_layers -------------------------------------------------------------------------

def test_family_layers_names_and_shapes():
    common = {"attention_norm": (M,), "mlp_norm": (M,), "gate": (M, MLP), "up": (M, MLP),
              "down": (MLP, M), "out": (H, D, M)}
    grouped = family_layers(0, "grouped", 4, M, H, 2, D, MLP, kv_share_every=2)
    assert [{k: v.shape for k, v in layer.items()} for layer in grouped] == [
        {**common, "q": (M, H, D), "k": (M, 2, D), "v": (M, 2, D)}, {**common, "q": (M, H, D)}] * 2
    tied = family_layers(0, "tied", 2, M, H, 2, D, MLP, kv_share_every=2)
    assert {k: v.shape for k, v in tied[0].items()} == {
        **common, "q": (M, H, D), "kv": (M, 2, D), "k_rope": (M, D // 2)}
    assert {k: v.shape for k, v in tied[1].items()} == {**common, "q": (M, H, D)}
    latent = {"kv_down": (M, 6), "kv_norm": (6,), "k_up": (6, H, D), "v_up": (6, H, D),
              "k_rope": (M, 2)}
    [layer] = family_layers(0, "latent", 1, M, H, 0, D, MLP, c=6, r=2)
    assert {k: v.shape for k, v in layer.items()} == {
        **common, **latent, "q": (M, H, D), "q_rope": (M, H, 2)}
    [layer] = family_layers(0, "latent", 1, M, H, 0, D, MLP, c=6, cq=5, r=2)
    assert {k: v.shape for k, v in layer.items()} == {
        **common, **latent, "q_down": (M, 5), "q_norm": (5,), "q": (5, H, D), "q_rope": (5, H, 2)}
    assert all(v.dtype == np.float64 for v in layer.values())
    assert 0.5 <= layer["kv_norm"].min() and layer["kv_norm"].max() <= 1.5
    for bad in (dict(attention="latent", kv_share_every=2, c=4), dict(attention="latent"),
                dict(attention="tied", r=3), dict(attention="nope")):
        with pytest.raises(ValueError):
            family_layers(0, bad.pop("attention"), 2, M, H, 2, D, MLP, **bad)


# --- grouped: unchanged ---------------------------------------------------------------------

@pytest.mark.parametrize("kv,share", [(4, 1), (2, 1), (1, 2), (2, 3)])
def test_grouped_default_is_the_original_reference(kv, share):
    layers, embed, final = model("grouped", num_layers=3, kv=kv, kv_share_every=share)
    got = transformer_loops(layers, embed, final, tokens(), kv_share_every=share)
    assert np.array_equal(got, original_transformer_loops(layers, embed, final, tokens(),
                                                          kv_share_every=share))
    got = transformer_loops(layers, embed, final, tokens(), kv_share_every=share,
                            attention="grouped", sliding_window=0, global_every=0,
                            quantize_kv=False, q_latent=False)
    assert np.array_equal(got, original_transformer_loops(layers, embed, final, tokens(),
                                                          kv_share_every=share))


# --- tied --------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", [1, 2, 4])
def test_tied_layer_is_grouped_attention_over_the_constructed_keys(kv):
    """Grouped weights built from the tied ones: k[:, c] = concat(kv[:, c, :n], k_rope) for every
    K/V head c, v = kv. With the tied layer's partial rope (last r dims) on Q and K, the grouped
    attention core (attention_loops) gives the tied layer's output."""
    [layer] = family_layers(3, "tied", 1, M, H, kv, D, MLP)
    x = normed_input()
    r = layer["k_rope"].shape[1]
    n = D - r
    k = np.concatenate([layer["kv"][:, :, :n], np.repeat(layer["k_rope"][:, None], kv, 1)], -1)
    q = partial_rope(np.einsum("btm,mhd->bthd", x, layer["q"]), n)
    keys = partial_rope(np.einsum("btm,mkd->btkd", x, k), n)
    values = np.einsum("btm,mkd->btkd", x, layer["kv"])
    want = np.einsum("bthd,hdm->btm", attention_loops(q, keys, values), layer["out"])
    got, (tied, rotary) = tied_loops(layer, x, theta=THETA)
    assert rel(got, want) < 1e-12
    assert tied.shape == (2, SEQ, kv, D) and rotary.shape == (2, SEQ, r)


def test_tied_kv_sharing_reads_the_first_layers_state():
    layers, embed, final = model("tied", num_layers=2, kv=2, kv_share_every=2)
    assert "kv" not in layers[1] and "k_rope" not in layers[1]
    shared = transformer_loops(layers, embed, final, tokens(), attention="tied", kv_share_every=2)
    extra = family_layers(9, "tied", 1, M, H, 2, D, MLP)[0]
    layers[1] = {**layers[1], "kv": extra["kv"], "k_rope": extra["k_rope"]}
    assert np.array_equal(shared, transformer_loops(layers, embed, final, tokens(),
                                                    attention="tied", kv_share_every=2))
    own = transformer_loops(layers, embed, final, tokens(), attention="tied")
    assert rel(own, shared) > 1e-3


# --- latent ------------------------------------------------------------------------------

@pytest.mark.parametrize("cq", [0, 5])
@pytest.mark.parametrize("window,quantize", [(0, False), (3, False), (0, True)])
def test_latent_expanded_equals_absorbed(cq, window, quantize):
    [layer] = family_layers(4, "latent", 1, M, H, 0, D, MLP, c=6, cq=cq, r=4)
    x = normed_input()
    kwargs = dict(q_latent=bool(cq), sliding_window=window, quantize_kv=quantize, theta=THETA)
    expanded = latent_loops(layer, x, **kwargs)
    assert rel(latent_absorbed_loops(layer, x, **kwargs), expanded) < 1e-10


def test_latent_layer_is_multi_head_attention_over_the_expanded_keys():
    """Per head: query concat(q_nope, q_r), key concat(L @ k_up, R) (R shared by all heads),
    value L @ v_up padded with r zeros; the attention core's 1/sqrt(d + r) is the latent's."""
    r, c = 4, 6
    [layer] = family_layers(5, "latent", 1, M, H, 0, D, MLP, c=c, r=r)
    x = normed_input()
    positions = np.arange(SEQ)
    latent = x @ layer["kv_down"]
    latent = latent / np.sqrt(np.mean(latent ** 2, -1, keepdims=True) + 1e-5) * layer["kv_norm"]
    rotary = rope((x @ layer["k_rope"])[:, :, None], positions, THETA)  # [b, s, 1, r]
    q = np.concatenate([np.einsum("btm,mhd->bthd", x, layer["q"]),
                        rope(np.einsum("btm,mhr->bthr", x, layer["q_rope"]), positions, THETA)], -1)
    k = np.concatenate([np.einsum("bsc,chd->bshd", latent, layer["k_up"]),
                        np.repeat(rotary, H, 2)], -1)
    v = np.concatenate([np.einsum("bsc,chd->bshd", latent, layer["v_up"]),
                        np.zeros((2, SEQ, H, r))], -1)
    want = np.einsum("bthd,hdm->btm", attention_loops(q, k, v)[..., :D], layer["out"])
    assert rel(latent_loops(layer, x, theta=THETA), want) < 1e-12


def test_latent_refuses_kv_sharing_and_mismatched_query_kind():
    layers, embed, final = model("latent", num_layers=2)
    with pytest.raises(ValueError):
        transformer_loops(layers, embed, final, tokens(), attention="latent", kv_share_every=2)
    with pytest.raises(ValueError):
        transformer_loops(layers, embed, final, tokens(), attention="latent", q_latent=True)
    with pytest.raises(ValueError):
        transformer_loops(layers, embed, final, tokens(), attention="grouped", q_latent=True)
    layers, embed, final = model("latent", num_layers=2, cq=5)
    logits = transformer_loops(layers, embed, final, tokens(), attention="latent", q_latent=True)
    assert logits.shape == (2, SEQ, VOCAB) and np.isfinite(logits).all()


# --- sliding window ----------------------------------------------------------------------

def test_local_layer_schedule():
    assert [is_local_layer(i, 4, 3) for i in range(6)] == [True, True, False] * 2
    assert [is_local_layer(i, 4, 0) for i in range(3)] == [True] * 3
    assert [is_local_layer(i, 0, 2) for i in range(3)] == [False] * 3
    assert [is_local_layer(i, 4, 1) for i in range(3)] == [False] * 3


@pytest.mark.parametrize("attention", ["grouped", "tied", "latent"])
def test_window_at_least_the_sequence_is_no_window(attention):
    layers, embed, final = model(attention, num_layers=2)
    full = transformer_loops(layers, embed, final, tokens(), attention=attention)
    for window, every in [(SEQ, 0), (SEQ + 5, 0), (2, 1)]:
        got = transformer_loops(layers, embed, final, tokens(), attention=attention,
                                sliding_window=window, global_every=every)
        assert rel(got, full) < 1e-13
    assert rel(transformer_loops(layers, embed, final, tokens(), attention=attention,
                                 sliding_window=SEQ - 1), full) > 1e-6


@pytest.mark.parametrize("attention", ["grouped", "tied", "latent"])
def test_one_local_layer_sees_only_its_window(attention):
    """One layer, window w: position t reads tokens t - w < s <= t only. Changing token p
    changes positions p .. p + w - 1 and no later one."""
    window, p = 3, 2
    layers, embed, final = model(attention, num_layers=1)
    toks = tokens(batch=1)
    changed = toks.copy()
    changed[0, p] = (toks[0, p] + 1) % VOCAB
    a, b = (transformer_loops(layers, embed, final, t, attention=attention,
                              sliding_window=window) for t in (toks, changed))
    differs = np.abs(a - b).max(-1)[0] > 1e-9
    assert differs.tolist() == [p <= t < p + window for t in range(SEQ)]
    # global: every later position sees it
    a, b = (transformer_loops(layers, embed, final, t, attention=attention)
            for t in (toks, changed))
    assert (np.abs(a - b).max(-1)[0] > 1e-9).tolist() == [t >= p for t in range(SEQ)]


@pytest.mark.parametrize("attention", ["grouped", "tied", "latent"])
def test_global_every_makes_the_last_layer_global(attention):
    """Two layers, window 2: all-local, position 8 sees tokens 6..8 at most; with
    global_every=2 the second layer is global and position 8 sees token 0."""
    layers, embed, final = model(attention, num_layers=2)
    toks = tokens(batch=1)
    changed = toks.copy()
    changed[0, 0] = (toks[0, 0] + 1) % VOCAB
    for every, reaches in [(0, False), (2, True), (3, False)]:
        a, b = (transformer_loops(layers, embed, final, t, attention=attention, sliding_window=2,
                                  global_every=every) for t in (toks, changed))
        assert (np.abs(a - b)[0, -1].max() > 1e-9) == reaches, every


def test_attention_loops_window_one_returns_the_own_value():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 5, 4, 8)), *rng.standard_normal((2, 2, 5, 2, 8))
    assert np.allclose(attention_loops(q, k, v, window=1), np.repeat(v, 2, axis=2), atol=1e-15)
    with pytest.raises(ValueError):
        attention_loops(q, k, v, causal=False, window=2)


# --- int8 KV cache -------------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step():
    magnitudes = np.array([1e-3, 1.0, 50.0])[:, None, None]
    x = np.random.default_rng(0).standard_normal((3, 5, 7)) * magnitudes
    scale = np.abs(x).max(-1, keepdims=True) / 127
    got = int8_round_trip(x)
    assert np.all(np.abs(got - x) <= scale / 2 * (1 + 1e-12))
    assert np.all(np.isclose(np.abs(got).max(-1), np.abs(x).max(-1), rtol=1e-15))  # max survives
    assert np.all(np.unique(np.round(got / scale)).size <= 255)


def test_int8_round_trip_exact_on_integer_grids_and_zero():
    rng = np.random.default_rng(1)
    ints = rng.integers(-127, 128, (4, 6)).astype(np.float64)
    ints[:, 0] = [127, -127, 127, -127]  # max |u| is 127: the grid's scale is the step
    for step in (1.0, 0.25, 2.0 ** -7, 8.0):
        assert np.array_equal(int8_round_trip(ints * step), ints * step)
    zero = int8_round_trip(np.zeros((2, 3)))
    assert np.array_equal(zero, np.zeros((2, 3)))
    mixed = int8_round_trip(np.stack([np.zeros(4), np.arange(4.0)]))
    assert np.isfinite(mixed).all() and np.array_equal(mixed[0], np.zeros(4))


def test_grouped_quantize_kv_rounds_roped_keys_and_values():
    [layer] = family_layers(6, "grouped", 1, M, H, 2, D, MLP)
    x = normed_input()
    positions = np.arange(SEQ)
    q = rope(np.einsum("btm,mhd->bthd", x, layer["q"]), positions, THETA)
    k = int8_round_trip(rope(np.einsum("btm,mkd->btkd", x, layer["k"]), positions, THETA))
    v = int8_round_trip(np.einsum("btm,mkd->btkd", x, layer["v"]))
    want = np.einsum("bthd,hdm->btm", attention_loops(q, k, v), layer["out"])
    got, _ = grouped_loops(layer, x, quantize_kv=True, theta=THETA)
    assert rel(got, want) < 1e-13


@pytest.mark.parametrize("attention", ["grouped", "tied", "latent"])
def test_quantize_kv_is_a_small_change(attention):
    layers, embed, final = model(attention, num_layers=2, kv_share_every=1)
    full = transformer_loops(layers, embed, final, tokens(), attention=attention)
    quantized = transformer_loops(layers, embed, final, tokens(), attention=attention,
                                  quantize_kv=True)
    assert 1e-7 < rel(quantized, full) < 3e-2


def test_tied_quantize_kv_rounds_the_cached_state():
    """The quantized layer equals the unquantized one fed the round-tripped (T, R)."""
    [layer] = family_layers(7, "tied", 1, M, H, 2, D, MLP)
    x = normed_input()
    _, (tied, rotary) = tied_loops(layer, x, theta=THETA)
    got, (qt, qr) = tied_loops(layer, x, quantize_kv=True, theta=THETA)
    assert np.array_equal(qt, int8_round_trip(tied)) and np.array_equal(qr, int8_round_trip(rotary))
    want, _ = tied_loops(layer, x, kv_state=(qt, qr), theta=THETA)
    assert np.array_equal(got, want)
