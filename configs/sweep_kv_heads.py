"""The KV-head sweep with error bars: MHA, GQA-4, GQA-2, MQA and MQA with cross-layer
sharing (CLA, kv_share_every=2), at an equal parameter count, over 13 seeds.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_sweep --decode_context=1024

A 4-layer, d_model 96 byte-level LM with 8 query heads of 12 dimensions on
tinyshakespeare (data/tinyshakespeare.txt, shipped with the repository). Its SwiGLU is
widened where K/V weights are removed, so every configuration has exactly the MHA model's
615,264 parameters (Shazeer 2019): each K/V head removed frees 2 x 12 x d_model weights per
layer, 8 SwiGLU units of 3 x d_model. Each run trains 400 steps of 16 x 128 tokens (0.82M
tokens, 0.8 of the 1.0M-token train split in windows drawn with replacement) and is
scored on the whole held-out split (111K tokens). Seed s gives every configuration the
same batches in the same order, so differences are paired by seed. Measured on 2 CPU
cores: 11,800-12,900 tokens/s, 1.25 minutes a run with its evaluation, about 80 minutes
for the 65 runs (13 seeds: about the fewest that bring the seed-paired 95% intervals of
GQA and MQA against MHA to +-0.015 nats). `--seeds=N` changes the number of seeds; finished runs are kept, so raising it
trains only the new seeds (docs/sweeps.md: how many seeds a tighter interval needs).

max_seq_len leaves room to time decoding at 1024 tokens of context (it adds no
parameters: positions are rotary).
"""

import pathlib

import ml_collections

from configs import default

TINYSHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def get_config():
    config = default.get_config()
    config.model.update(d_model=96, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=12,
                        mlp_dim=384, match_mha_params=True, max_seq_len=2048,
                        attention_impl="einsum")  # the core the published runs trained with
    config.train.update(steps=400, batch_size=16, seq_len=128, learning_rate=2e-3,
                        warmup_steps=40, log_every=50, eval_every=100, eval_batches=8,
                        sampling="uniform")  # the windows the published runs trained on
    config.data.path = str(TINYSHAKESPEARE)
    config.checkpoint.every = 200
    config.sweep = ml_collections.ConfigDict({
        "points": [
            {"name": "MHA", "model.num_kv_heads": 8},
            {"name": "GQA-4", "model.num_kv_heads": 4},
            {"name": "GQA-2", "model.num_kv_heads": 2},
            {"name": "MQA", "model.num_kv_heads": 1},
            {"name": "MQA+CLA2", "model.num_kv_heads": 1, "model.kv_share_every": 2},
        ],
        "train.seed": list(range(13)),
    }, allow_dotted_keys=True)
    return config
