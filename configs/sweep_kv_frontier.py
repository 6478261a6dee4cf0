"""The KV-cache frontier, designed for review (issue #27): every way to shrink the cache,
each arm's learning rate tuned on data it is not scored on, quality measured at the
context its cost is reported at, the papers' comparisons declared before any run.

  python sweep.py --config=configs/sweep_kv_frontier.py --workdir=runs/kv_frontier

Model: 4 layers, d_model 128, 4 query heads of 32 dimensions (so GTA's and MLA's shared
rotary part has 16 dimensions, 8 frequencies), SwiGLU of 256 (MHA: 689,280 parameters),
byte-level, widened or narrowed to MHA's parameter count (match_mha_params) except in
MQA-narrow. Training: 900 steps of 16 windows of 256 tokens (3.7M tokens, 5.4 per
parameter: 4x the 1.3 of configs/sweep_kv_budget.py) of tinyshakespeare's train split,
drawn without replacement (a permutation of window starts per pass; about 3.7 passes),
cosine schedule. Scoring: the held-out split in non-overlapping 256-token windows, the
trained context; KV bytes and decoding speed are reported at that context too.

Learning rate: tuned per arm over 1e-3, 2e-3, 4e-3, 8e-3 (an 8x span) on tuning seed
1000, chosen on the held-out split's tuning half; the reporting seeds train at the chosen
rate and are scored on the test half (`mqa.sweep.tuning`). The grid was 1e-3..4e-3 when
the runs began; MHA's three tuning runs (the first of all) tied at its top edge (tuning
half 1.5820, 1.5225, 1.5223 nats), so 8e-3 was added for every arm before any other run,
on tuning data only.

Arms (numbers cached per token and layer; MHA 256):
  MHA 256 | GQA-2 128 | MQA 64 | MQA-narrow 64 (MLP not widened: fewer parameters)
  MQA+CLA2 32 (K/V shared by each pair of layers) | MHA-halfrope 256 (rotary on 16 of 32 dims)
  GTA-2 80, GTA-1 48 (tied K/V state per K/V head + a shared 16-dim rotary key; Zadouri et al.)
  MLA-144: latent 128 + 16 rotary (DeepSeek-V2's operating point: latent 4 x head_dim,
    the cache of GQA with 2.25 groups) | MLA-64: latent 48 + 16 rotary (MQA's cache)
  local64+global: layers 0-2 see the last 64 positions (a quarter of the trained
    context), layer 3 everything | MHA-int8, MQA-int8: int8 caches of MHA's and MQA's
    trained runs (scored through the cache; they train exactly as MHA and MQA, so the
    sweep copies those runs and only evaluates).

Seeds: the committed KV-budget sweep's seed-paired sds of the differences against MHA have
a median of 0.018 nats (0.014-0.035); a 95% half-width of t(n-1) * sd / sqrt(n) <= 0.012
needs n = 11 at sd 0.018 (2.23 * 0.018 / 3.32 = 0.0121). 11 reporting seeds (0-10).

Runs: 11 trained arms x (4 tuning + 11 reporting) = 165 runs of about 3.3 minutes on 2
CPU cores (about 9 hours), plus the int8 evaluations. Every finished run is recorded in
benchmarks/results/kv_frontier/records/ (`sweep.record`), which is committed as runs finish:
the same command in a fresh clone skips every recorded run and continues.
"""

import pathlib

import ml_collections

from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUPED = {"model.attention": "grouped"}
TIED = {"model.attention": "tied"}
LATENT = {"model.attention": "latent", "model.rope_head_dim": 16}
CONTRASTS = ["MQA:MQA-narrow", "MHA-halfrope:MHA", "GTA-2:GQA-2", "GTA-1:MQA", "MLA-144:MHA",
             "MLA-144:MHA-halfrope", "MQA+CLA2:MQA", "local64+global:MHA", "MQA-int8:MQA"]


def get_config():
    config = default.get_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                        mlp_dim=256, match_mha_params=True, max_seq_len=512)
    config.train.update(steps=900, batch_size=16, seq_len=256, learning_rate=2e-3,
                        warmup_steps=50, log_every=50, eval_every=300, eval_batches=4,
                        sampling="permutation")
    config.data.path = str(REPO / "data" / "tinyshakespeare.txt")
    config.checkpoint.every = 300
    config.sweep = ml_collections.ConfigDict({
        "points": [
            {"name": "MHA", "model.num_kv_heads": 4},
            {"name": "GQA-2", "model.num_kv_heads": 2},
            {"name": "MQA", "model.num_kv_heads": 1},
            {"name": "MQA-narrow", "model.num_kv_heads": 1, "model.match_mha_params": False},
            {"name": "MQA+CLA2", "model.num_kv_heads": 1, "model.kv_share_every": 2},
            {"name": "MHA-halfrope", "model.num_kv_heads": 4, "model.rope_head_dim": 16},
            {"name": "GTA-2", **TIED, "model.num_kv_heads": 2},
            {"name": "GTA-1", **TIED, "model.num_kv_heads": 1},
            {"name": "MLA-144", **LATENT, "model.kv_latent_dim": 128},
            {"name": "MLA-64", **LATENT, "model.kv_latent_dim": 48},
            {"name": "local64+global", "model.sliding_window": 64, "model.global_every": 4},
            {"name": "MHA-int8", "model.num_kv_heads": 4, "model.kv_cache_dtype": "int8"},
            {"name": "MQA-int8", "model.num_kv_heads": 1, "model.kv_cache_dtype": "int8"},
        ],
        "train.seed": list(range(11)),
        "tune": {"train.learning_rate": [1e-3, 2e-3, 4e-3, 8e-3]},
        "tune_seeds": 1,
        "contrasts": CONTRASTS,
        "record": str(REPO / "benchmarks" / "results" / "kv_frontier" / "records"),
    }, allow_dotted_keys=True)
    return config
