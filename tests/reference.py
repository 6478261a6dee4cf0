"""Independent float64 NumPy references the tests compare against.

Written from the mathematics, head by head, not from the JAX code:

- `attention_loops`: the attention core (causal, optionally sliding-window) for MHA/GQA/MQA.
- `rope`: rotary embeddings, pairing dimension i with i + dim/2; `partial_rope`: on the last
  dimensions of each head only.
- `int8_round_trip`: what an int8 KV cache gives back for a tensor (per vector, last axis).
- `grouped_loops`, `tied_loops`, `latent_loops`, `latent_absorbed_loops`: one attention
  layer of each family (grouped-query; Grouped-Tied Attention, Zadouri, Strauss & Dao 2025;
  Multi-head Latent Attention, DeepSeek-V2 2024, expanded and in its absorbed decoding form).
- `transformer_loops`: the whole language model, layer after layer, with Gemma 3's
  variations as options (QK-norm, post-norms, (1 + w) norms, GeGLU, a local RoPE base,
  the embedding scale, the attention scale).
- `family_layers`: random float64 layer parameters for each family.
"""

import numpy as np

FAMILIES = ("grouped", "tied", "latent")


def _f64(a):
    return np.asarray(a, np.float64)


def rms_norm(x, scale, eps, one_plus=False):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis; * (1 + scale) with one_plus
    (Gemma's norms)."""
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (one_plus + _f64(scale))


def gelu_tanh(x):
    """GELU's tanh approximation: x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def allowed_mask(q_len, kv_len, *, q_offset=None, window=0, sinks=0):
    """bool [q_len, kv_len]: query i (absolute position t = offset + i) may read key s iff
    s <= t and, with window > 0, t - window < s or s < sinks (attention sinks)."""
    offset = kv_len - q_len if q_offset is None else q_offset
    t = (offset + np.arange(q_len))[:, None]
    s = np.arange(kv_len)[None, :]
    allowed = s <= t
    if window > 0:
        allowed &= (s > t - window) | (s < sinks)
    return allowed


def _masked_softmax(logits, allowed):
    """Softmax over the last axis of logits [batch, q_len, kv_len], keys where `allowed`
    [q_len, kv_len] only."""
    logits = np.where(allowed[None], logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)


def attention_loops(q, k, v, *, causal=True, q_offset=None, window=0, score_dim=None, sinks=0):
    """Attention written head by head: query head h reads K/V head h // group.

    q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim] -> [batch, q_len, heads, dim].
    window > 0 (causal only): the query at absolute position t reads keys t - window < s <= t.
    Scores are q.k / sqrt(score_dim), score_dim defaulting to dim.
    """
    if window > 0 and not causal:
        raise ValueError("a sliding window is causal")
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    offset = kv_len - q_len if q_offset is None else q_offset
    out = np.zeros_like(q)
    for h in range(heads):
        kh = h // group
        logits = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / np.sqrt(score_dim or dim)
        if causal:
            allowed = allowed_mask(q_len, kv_len, q_offset=offset, window=window, sinks=sinks)
            logits = np.where(allowed[None], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", probs, v[:, :, kh])
    return out


def rope(x, positions, theta, frequency_dim=0, pairs=None):
    """Rotary embeddings, pairing dimension i with i + d/2, turning by position *
    theta**(-2i / D), D = frequency_dim or d; with pairs [heads, d/2] pair i of head j turns
    by position * theta**(-2 pairs[j, i] / D). x: [batch, seq, heads, dim]."""
    half = x.shape[-1] // 2
    index = np.arange(half)[None] if pairs is None else np.asarray(pairs, np.float64)  # [1 or heads, half]
    angles = np.asarray(positions, np.float64)[:, None, None] * theta ** (
        -2.0 * index / (frequency_dim or x.shape[-1]))                # [seq, 1 or heads, half]
    cos, sin = np.cos(angles)[None], np.sin(angles)[None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def partial_rope(x, positions, theta, rope_dim):
    """Rotary embeddings on the last `rope_dim` dimensions of each head only (0: all of them),
    written pair by pair: with n = dim - rope_dim and r = rope_dim, dimensions n + i and
    n + i + r/2 turn by position * theta**(-2i / r); dimensions 0..n-1 are left as they are.
    x: [batch, seq, heads, dim]."""
    x = _f64(x)
    dim = x.shape[-1]
    r = rope_dim or dim
    n, pairs = dim - r, r // 2
    out = x.copy()
    for i in range(pairs):
        angle = np.asarray(positions, np.float64) * theta ** (-2.0 * i / r)  # [seq]
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        a, b = x[..., n + i], x[..., n + i + pairs]
        out[..., n + i] = a * cos - b * sin
        out[..., n + i + pairs] = b * cos + a * sin
    return out


def _rope_headless(x, positions, theta):
    """`rope` of x [batch, seq, dim] (no heads axis): one heads axis of size 1."""
    return rope(x[:, :, None, :], positions, theta)[:, :, 0, :]


def int8_round_trip(x):
    """An int8 cache's round trip of each vector u along the last axis:
    scale = max|u| / 127, q = clip(round(u / scale), -127, 127), result q * scale.
    A zero vector stays zero."""
    x = _f64(x)
    scale = np.max(np.abs(x), axis=-1, keepdims=True) / 127
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(x / safe), -127, 127)
    return np.where(scale > 0, q * scale, 0.0)


def is_local_layer(index, sliding_window, global_every):
    """Layer `index` (0-based) uses the sliding window iff sliding_window > 0 and it is not
    one of every `global_every`-th layers ((index + 1) % global_every == 0)."""
    return sliding_window > 0 and not (global_every > 0 and (index + 1) % global_every == 0)


def grouped_loops(layer, x, *, kv_state=None, sliding_window=0, quantize_kv=False,
                  theta=10000.0, score_dim=None, eps=1e-5, one_plus=False, rope_dim=0, sinks=0):
    """One grouped-query attention layer (before the residual).

    layer: `q` [m, h, d], `out` [h, d, m] and, unless kv_state is given, `k`, `v` [m, kv, d];
    with `q_norm`, `k_norm` [d] each query and key head is RMS-normed (eps; one_plus: by
    1 + the scale) before rope (Gemma 3's QK-norm). x: the layer's normed input [batch, seq,
    m]. kv_state: (K, V) computed by an earlier layer (cross-layer sharing), used as is.
    score_dim: see `attention_loops`. rope_dim > 0: rope on the last rope_dim dimensions of
    each query and key head only (`partial_rope`; partial RoPE, "MHA-halfrope"). Returns
    (output [batch, seq, m], (K, V)), K after rope; with quantize_kv both are int8 round
    trips per token and K/V head.
    """
    positions = np.arange(x.shape[1])

    def head_norm(y, name):
        return rms_norm(y, layer[name], eps, one_plus) if name in layer else y

    def rotate(y):
        return partial_rope(y, positions, theta, rope_dim) if rope_dim else rope(y, positions, theta)

    q = rotate(head_norm(np.einsum("btm,mhd->bthd", x, _f64(layer["q"])), "q_norm"))
    if kv_state is None:
        k = rotate(head_norm(np.einsum("btm,mkd->btkd", x, _f64(layer["k"])), "k_norm"))
        v = np.einsum("btm,mkd->btkd", x, _f64(layer["v"]))
        if quantize_kv:
            k, v = int8_round_trip(k), int8_round_trip(v)
        kv_state = (k, v)
    k, v = kv_state
    attended = attention_loops(q, k, v, window=sliding_window, score_dim=score_dim, sinks=sinks)
    return np.einsum("bthd,hdm->btm", attended, _f64(layer["out"])), kv_state


def tied_loops(layer, x, *, kv_state=None, sliding_window=0, quantize_kv=False, theta=10000.0,
               sinks=0):
    """One Grouped-Tied Attention layer (Zadouri, Strauss & Dao 2025), before the residual.

    layer: `q` [m, h, d], `out` [h, d, m] and, unless kv_state is given, `kv` [m, kv, d] and
    `k_rope` [m, r] (r = d // 2 in the paper; read from k_rope's shape), n = d - r.
    Query head j: Qj = x @ q[:, j]; query = concat(Qj[:n], rope(Qj[n:])) (rope within the r dims).
    Tied state T = x @ kv (per K/V head); rotary key R = rope(x @ k_rope), one for all heads.
    K/V head c: key = concat(T_c[:n], R), value = T_c. logits = query . key / sqrt(d).
    kv_state: (T, R) of an earlier layer, used as is. Returns (output [batch, seq, m], (T, R));
    with quantize_kv, T (per token and K/V head) and R (per token) are int8 round trips.
    """
    batch, seq, _ = x.shape
    positions = np.arange(seq)
    wq, wout = _f64(layer["q"]), _f64(layer["out"])
    heads, d = wq.shape[1], wq.shape[2]
    if kv_state is None:
        tied = np.einsum("btm,mkd->btkd", x, _f64(layer["kv"]))
        rotary = _rope_headless(np.einsum("btm,mr->btr", x, _f64(layer["k_rope"])), positions,
                                theta)
        if quantize_kv:
            tied, rotary = int8_round_trip(tied), int8_round_trip(rotary)
        kv_state = (tied, rotary)
    tied, rotary = kv_state
    kv_heads, r = tied.shape[2], rotary.shape[-1]
    n, group = d - r, heads // kv_heads
    allowed = allowed_mask(seq, seq, window=sliding_window, sinks=sinks)
    output = np.zeros((batch, seq, wout.shape[-1]))
    for j in range(heads):
        c = j // group
        qj = np.einsum("btm,md->btd", x, wq[:, j])
        query = np.concatenate([qj[..., :n], _rope_headless(qj[..., n:], positions, theta)], -1)
        key = np.concatenate([tied[:, :, c, :n], rotary], -1)
        value = tied[:, :, c]
        probs = _masked_softmax(np.einsum("btd,bsd->bts", query, key) / np.sqrt(d), allowed)
        output += np.einsum("bts,bsd->btd", probs, value) @ wout[j]
    return output, kv_state


def _latent_parts(layer, x, q_latent, quantize_kv, theta, eps, frequency_dim):
    """(L, R, qin) of a latent layer: the cached latent (RMS-normed when the layer has
    `kv_norm`), the rotary keys [batch, seq, R, r] (R = k_rope's width / r), and the
    queries' input."""
    if ("q_down" in layer) != q_latent:
        has = "has" if "q_down" in layer else "lacks"
        raise ValueError(f"q_latent={q_latent} but the layer {has} q_down")
    positions = np.arange(x.shape[1])
    latent = x @ _f64(layer["kv_down"])
    if "kv_norm" in layer:
        latent = rms_norm(latent, layer["kv_norm"], eps)
    r = layer["q_rope"].shape[-1]
    keys = x @ _f64(layer["k_rope"])
    rotary = rope(keys.reshape(*keys.shape[:2], -1, r), positions, theta, frequency_dim,
                  layer.get("rope_pairs"))
    if quantize_kv:  # one cached vector per token: the latent followed by the rotary keys
        both = int8_round_trip(np.concatenate([latent, rotary.reshape(keys.shape)], -1))
        latent = both[..., :latent.shape[-1]]
        rotary = both[..., latent.shape[-1]:].reshape(rotary.shape)
    qin = rms_norm(x @ _f64(layer["q_down"]), layer["q_norm"], eps) if q_latent else x
    return latent, rotary, qin


def _head_pairs(layer, key_head):
    """The pairs [1, r/2] of rotary key `key_head`, which its query heads turn at too
    (None without `rope_pairs`)."""
    pairs = layer.get("rope_pairs")
    return None if pairs is None else np.asarray(pairs)[key_head][None]


def _latent_setup(layer, x, q_latent, sliding_window, quantize_kv, theta, eps, sinks,
                  frequency_dim):
    """What both latent forms start from: (L, R, the query input, positions, the mask)."""
    latent, rotary, qin = _latent_parts(layer, x, q_latent, quantize_kv, theta, eps, frequency_dim)
    seq = x.shape[1]
    return latent, rotary, qin, np.arange(seq), allowed_mask(seq, seq, window=sliding_window,
                                                             sinks=sinks)


def latent_loops(layer, x, *, q_latent=False, sliding_window=0, quantize_kv=False,
                 theta=10000.0, eps=1e-5, sinks=0, frequency_dim=0):
    """One Multi-head Latent Attention layer (DeepSeek-V2 2024), expanded, before the residual.

    layer: `kv_down` [m, c], `kv_norm` [c], `k_up` [c, h, d], `v_up` [c, h, d], `k_rope` [m, r],
    `out` [h, d, m]; queries from qin = x (q_latent=False: `q` [m, h, d], `q_rope` [m, h, r]) or
    qin = norm(x @ q_down, q_norm) (q_latent=True: `q_down` [m, cq], `q_norm` [cq], `q` [cq, h, d],
    `q_rope` [cq, h, r]). L = norm(x @ kv_down, kv_norm) (no norm when the layer lacks
    kv_norm); rotary keys R_1..R_n = rope(x @ k_rope) split into n = k_rope's width / r
    keys, head j reading R_(j // (h / n)). Rope turns at theta**(-2i / frequency_dim)
    (0: r), or with `rope_pairs` [n, r/2] in the layer, key R_k's pair i and its query
    heads' at theta**(-2 rope_pairs[k, i] / frequency_dim). Head j: key = L @ k_up[:, j], value = L @ v_up[:, j], q_nope = qin @ q[:, j],
    q_r = rope(qin @ q_rope[:, j]); logits = (q_nope . key + q_r . R_j) / sqrt(d + r).
    With quantize_kv, [L, R] (after rope) is one int8 round trip per token. -> [batch, seq, m].
    """
    latent, rotary, qin, positions, allowed = _latent_setup(layer, x, q_latent, sliding_window,
                                                            quantize_kv, theta, eps, sinks,
                                                            frequency_dim)
    wq, wq_rope, k_up, v_up, wout = (_f64(layer[name]) for name in
                                     ("q", "q_rope", "k_up", "v_up", "out"))
    heads, d, r = wq.shape[1], wq.shape[2], rotary.shape[-1]
    output = np.zeros((x.shape[0], x.shape[1], wout.shape[-1]))
    for j in range(heads):
        key = np.einsum("bsc,cd->bsd", latent, k_up[:, j])
        value = np.einsum("bsc,cd->bsd", latent, v_up[:, j])
        q_nope = np.einsum("bti,id->btd", qin, wq[:, j])
        key_head = j // (heads // rotary.shape[2])
        q_r = rope(np.einsum("bti,ir->btr", qin, wq_rope[:, j])[:, :, None], positions, theta,
                   frequency_dim, _head_pairs(layer, key_head))[:, :, 0]
        rotary_j = rotary[:, :, key_head]
        logits = (np.einsum("btd,bsd->bts", q_nope, key)
                  + np.einsum("btr,bsr->bts", q_r, rotary_j)) / np.sqrt(d + r)
        probs = _masked_softmax(logits, allowed)
        output += np.einsum("bts,bsd->btd", probs, value) @ wout[j]
    return output


def latent_absorbed_loops(layer, x, *, q_latent=False, sliding_window=0, quantize_kv=False,
                          theta=10000.0, eps=1e-5, sinks=0, frequency_dim=0):
    """The same layer as `latent_loops` in the absorbed form DeepSeek decodes with: per head,
    q[:, j] @ k_up[:, j]^T maps queries into the latent space, scores are taken against L
    directly (plus the rotary part), and the attention-weighted latent leaves through
    v_up[:, j] @ out[j] [c, m]. Keys and values are never expanded. -> [batch, seq, m]."""
    latent, rotary, qin, positions, allowed = _latent_setup(layer, x, q_latent, sliding_window,
                                                            quantize_kv, theta, eps, sinks,
                                                            frequency_dim)
    wq, wq_rope, k_up, v_up, wout = (_f64(layer[name]) for name in
                                     ("q", "q_rope", "k_up", "v_up", "out"))
    heads, d, r = wq.shape[1], wq.shape[2], rotary.shape[-1]
    output = np.zeros((x.shape[0], x.shape[1], wout.shape[-1]))
    for j in range(heads):
        q_absorbed = np.einsum("id,cd->ic", wq[:, j], k_up[:, j])  # [qin dim, c]
        out_absorbed = np.einsum("cd,dm->cm", v_up[:, j], wout[j])  # [c, m]
        q_latent_space = np.einsum("bti,ic->btc", qin, q_absorbed)
        key_head = j // (heads // rotary.shape[2])
        q_r = rope(np.einsum("bti,ir->btr", qin, wq_rope[:, j])[:, :, None], positions, theta,
                   frequency_dim, _head_pairs(layer, key_head))[:, :, 0]
        rotary_j = rotary[:, :, key_head]
        logits = (np.einsum("btc,bsc->bts", q_latent_space, latent)
                  + np.einsum("btr,bsr->bts", q_r, rotary_j)) / np.sqrt(d + r)
        probs = _masked_softmax(logits, allowed)
        output += np.einsum("bts,bsc->btc", probs, latent) @ out_absorbed
    return output


def transformer_loops(layers, embed, final_scale, tokens, *, kv_share_every=1, theta=10000.0,
                      eps=1e-5, attention="grouped", sliding_window=0, global_every=0,
                      quantize_kv=False, q_latent=False, local_theta=0.0, score_dim=None,
                      embed_scale=False, one_plus=False, activation="silu", unembed=None,
                      rope_dim=0, sinks=0, rope_frequency_dim=0, rope_global_every=0):
    """The language model's logits, one layer after another.

    layers: a list, in order, of dicts with `attention_norm`, `mlp_norm`, `gate`, `up`, `down`
      and the attention family's parameters (see `grouped_loops`, `tied_loops`,
      `latent_loops`; `family_layers` makes them). With kv_share_every > 1 (grouped, tied) only
      the layers whose index is a multiple of it need their K/V parameters (grouped `k`, `v`;
      tied `kv`, `k_rope`); the layers between reuse the K/V (T/R) that layer computed.
    attention: "grouped" | "tied" | "latent". sliding_window > 0: local layers (see
      `is_local_layer`, with global_every) attend to the last `sliding_window` positions,
      and to the first `sinks` (attention sinks).
    quantize_kv: what a cache holds is replaced by its int8 round trip before use.
    q_latent (latent only): queries through a normed low-rank q_down.
    Gemma 3's options: local_theta > 0 is the rope base of local layers; score_dim (grouped)
    scales scores by 1 / sqrt(score_dim); embed_scale multiplies the embeddings by
    sqrt(m); one_plus scales every norm by 1 + its weight; activation "gelu_tanh" makes the
    MLP GeGLU; a layer with `q_norm`/`k_norm` norms its query/key heads (grouped), one with
    `attention_post_norm`/`mlp_post_norm` norms the attention/MLP output before its residual.
    unembed: [m, vocab], the output matrix of untied embeddings (None: embed.T, tied).
    rope_dim (grouped): rope on the last rope_dim dimensions of each head only (see `grouped_loops`).
    rope_frequency_dim (latent): see `latent_loops`. rope_global_every > 0: layers i with
    (i + 1) % rope_global_every == 0 take theta, the others local_theta, whatever their window.
    tokens: int [batch, seq] -> float64 logits [batch, seq, vocab].
    """
    if attention not in FAMILIES:
        raise ValueError(f"attention must be one of {FAMILIES}, not {attention!r}")
    if attention == "latent" and kv_share_every != 1:
        raise ValueError("latent attention does not share K/V across layers (kv_share_every=1)")
    if q_latent and attention != "latent":
        raise ValueError("q_latent is for latent attention only")
    if rope_dim and attention != "grouped":
        raise ValueError("rope_dim is for grouped attention only (tied and latent take their rotary width)")
    if kv_share_every < 1 or sliding_window < 0 or global_every < 0:
        raise ValueError("kv_share_every must be >= 1, sliding_window and global_every >= 0")
    x = _f64(embed)[np.asarray(tokens)] * (np.sqrt(_f64(embed).shape[1]) if embed_scale else 1.0)
    kv_state = None

    def norm(y, name):
        return rms_norm(y, layer[name], eps, one_plus) if name in layer else y

    for i, layer in enumerate(layers):
        local = is_local_layer(i, sliding_window, global_every)
        window = sliding_window if local else 0
        h = norm(x, "attention_norm")
        if i % kv_share_every == 0:
            kv_state = None
        common = dict(sliding_window=window, quantize_kv=quantize_kv, sinks=sinks if local else 0,
                      theta=local_theta if local_theta and (
                          (i + 1) % rope_global_every if rope_global_every else local) else theta)
        if attention == "grouped":
            attended, kv_state = grouped_loops(layer, h, kv_state=kv_state, score_dim=score_dim,
                                               eps=eps, one_plus=one_plus, rope_dim=rope_dim, **common)
        elif attention == "tied":
            attended, kv_state = tied_loops(layer, h, kv_state=kv_state, **common)
        else:
            attended = latent_loops(layer, h, q_latent=q_latent, eps=eps,
                                    frequency_dim=rope_frequency_dim, **common)
        x = x + norm(attended, "attention_post_norm")
        h = norm(x, "mlp_norm")
        gate, up = h @ _f64(layer["gate"]), h @ _f64(layer["up"])
        act = gelu_tanh(gate) if activation == "gelu_tanh" else gate / (1 + np.exp(-gate))
        x = x + norm((act * up) @ _f64(layer["down"]), "mlp_post_norm")
    return rms_norm(x, final_scale, eps, one_plus) @ (_f64(embed).T if unembed is None else _f64(unembed))


def family_layers(rng, attention, num_layers, m, h, kv, d, mlp, *, c=0, cq=0, r=0,
                  kv_share_every=1):
    """Random float64 layer dicts for `transformer_loops(..., attention=attention)`.

    Every layer: attention_norm [m], mlp_norm [m] (uniform 0.5..1.5), gate [m, mlp],
    up [m, mlp], down [mlp, m], out [h, d, m]; projections are normal / sqrt(fan-in).
    grouped: q [m, h, d], k [m, kv, d], v [m, kv, d].
    tied: q [m, h, d], kv [m, kv, d], k_rope [m, r] (r = d // 2 when r == 0).
    latent (kv unused; c > 0; r = d // 2 when r == 0): kv_down [m, c], kv_norm [c],
      k_up [c, h, d], v_up [c, h, d], k_rope [m, r], and q [m, h, d], q_rope [m, h, r] when
      cq == 0, or (q_latent=True) q_down [m, cq], q_norm [cq], q [cq, h, d], q_rope [cq, h, r].
    With kv_share_every > 1 (grouped, tied) layers whose index is not a multiple of it omit
    k, v (grouped) or kv, k_rope (tied). rng: a numpy Generator or a seed.
    """
    rng = np.random.default_rng(rng)
    if attention not in FAMILIES:
        raise ValueError(f"attention must be one of {FAMILIES}, not {attention!r}")
    if attention == "latent" and kv_share_every != 1:
        raise ValueError("latent attention does not share K/V across layers (kv_share_every=1)")
    if attention != "latent" and h % kv:
        raise ValueError(f"{h} query heads do not split into {kv} K/V head groups")
    r = r or d // 2
    if attention != "grouped" and (r % 2 or r <= 0 or (attention == "tied" and r > d)):
        raise ValueError(f"the rotary width r={r} must be even, positive (and <= d for tied)")
    if attention == "grouped" and d % 2:
        raise ValueError("rope needs an even head dim")
    if attention == "latent" and c <= 0:
        raise ValueError("latent attention needs a latent width c > 0")

    def normal(*shape, fan_in):
        return rng.standard_normal(shape) * fan_in ** -0.5

    def scale(n):
        return rng.uniform(0.5, 1.5, n)

    layers = []
    for i in range(num_layers):
        owns_kv = i % kv_share_every == 0
        layer = {"attention_norm": scale(m)}
        if attention == "grouped":
            layer["q"] = normal(m, h, d, fan_in=m)
            if owns_kv:
                layer["k"] = normal(m, kv, d, fan_in=m)
                layer["v"] = normal(m, kv, d, fan_in=m)
        elif attention == "tied":
            layer["q"] = normal(m, h, d, fan_in=m)
            if owns_kv:
                layer["kv"] = normal(m, kv, d, fan_in=m)
                layer["k_rope"] = normal(m, r, fan_in=m)
        else:
            if cq:
                layer["q_down"] = normal(m, cq, fan_in=m)
                layer["q_norm"] = scale(cq)
                layer["q"] = normal(cq, h, d, fan_in=cq)
                layer["q_rope"] = normal(cq, h, r, fan_in=cq)
            else:
                layer["q"] = normal(m, h, d, fan_in=m)
                layer["q_rope"] = normal(m, h, r, fan_in=m)
            layer["kv_down"] = normal(m, c, fan_in=m)
            layer["kv_norm"] = scale(c)
            layer["k_up"] = normal(c, h, d, fan_in=c)
            layer["v_up"] = normal(c, h, d, fan_in=c)
            layer["k_rope"] = normal(m, r, fan_in=m)
        layer["out"] = normal(h, d, m, fan_in=h * d)
        layer["mlp_norm"] = scale(m)
        layer["gate"] = normal(m, mlp, fan_in=m)
        layer["up"] = normal(m, mlp, fan_in=m)
        layer["down"] = normal(mlp, m, fan_in=mlp)
        layers.append(layer)
    return layers
