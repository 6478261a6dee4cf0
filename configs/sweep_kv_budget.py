"""The KV-budget frontier: every way to shrink the KV cache, at an equal parameter count.

  python sweep.py --config=configs/sweep_kv_budget.py --workdir=runs/kv_budget --decode_context=1024

The papers' own comparisons are declared below as the sweep's contrasts (`CONTRASTS`,
sweep.contrasts; they were --compare flags when the published results were made): each is
a seed-paired difference in comparisons.csv, and they and every method against MHA are one
family whose p-values are Holm-adjusted together (docs/sweeps.md). Three of them
(MLA-24:MHA, MLA-12:MHA, MHA-int8:MHA) are also comparisons against the baseline and count
once: 11 against MHA and 5 more contrasts, 16 comparisons.

The model and training of configs/sweep_kv_heads.py (4 layers, d_model 96, 8 query heads of
12 dimensions, 400 steps of 16 x 128 tokens of tinyshakespeare, the whole held-out split)
with twelve ways to cache keys and values, each with its SwiGLU widened (or narrowed) to
the MHA model's parameter count (match_mha_params). Numbers cached per token and layer:

  MHA 192 | GQA-4 96 | GQA-2 48 | MQA 24 | MQA+CLA2 12 (every other layer)
  GTA-2 30 | GTA-1 18 (tied state per K/V head + a shared 6-dim rotary key)
  MLA-24 30 | MLA-12 18 (latent + the 6-dim rotary key)
  local32+global: MHA whose layers 0-2 see the last 32 positions (32-slot rings), layer 3 all
  MHA-int8, MQA-int8: 192 and 24 bytes + a 4-byte scale per token and head

The int8 points train exactly as MHA and MQA (the cache plays no part in training) and are
scored through their cache, so their differences from MHA and MQA are the quantization's
alone. KV bytes are reported at the context decoding is timed at (1,024). About 15
minutes a seed on 2 CPU cores; 8 seeds, about two hours. `--seeds=N` changes it; finished
runs are kept, so raising it trains only the new seeds.
"""

import ml_collections

from configs import sweep_kv_heads

TIED = {"model.attention": "tied"}
CONTRASTS = ["GTA-2:GQA-2", "GTA-1:MQA", "MQA+CLA2:MQA", "MLA-24:MHA", "MLA-12:MHA", "MLA-12:MQA",
             "MHA-int8:MHA", "MQA-int8:MQA"]
LATENT = {"model.attention": "latent", "model.rope_head_dim": 6}


def get_config():
    config = sweep_kv_heads.get_config()  # the same model, data and training
    config.train.sampling = "uniform"  # stated here too: the windows the published runs trained on
    config.sweep = ml_collections.ConfigDict({
        "points": [
            {"name": "MHA", "model.num_kv_heads": 8},
            {"name": "GQA-4", "model.num_kv_heads": 4},
            {"name": "GQA-2", "model.num_kv_heads": 2},
            {"name": "MQA", "model.num_kv_heads": 1},
            {"name": "MQA+CLA2", "model.num_kv_heads": 1, "model.kv_share_every": 2},
            {"name": "GTA-2", **TIED, "model.num_kv_heads": 2},
            {"name": "GTA-1", **TIED, "model.num_kv_heads": 1},
            {"name": "MLA-24", **LATENT, "model.kv_latent_dim": 24},
            {"name": "MLA-12", **LATENT, "model.kv_latent_dim": 12},
            {"name": "local32+global", "model.sliding_window": 32, "model.global_every": 4},
            {"name": "MHA-int8", "model.kv_cache_dtype": "int8"},
            {"name": "MQA-int8", "model.num_kv_heads": 1, "model.kv_cache_dtype": "int8"},
        ],
        "train.seed": list(range(8)),
        "contrasts": CONTRASTS,
    }, allow_dotted_keys=True)
    return config
