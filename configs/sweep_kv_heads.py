"""The num_kv_heads sweep: MHA (8), GQA (4, 2) and MQA (1) at an equal parameter count.

  python sweep.py --config=configs/sweep_kv_heads.py --workdir=runs/kv_sweep

A 4-layer, d_model 96 byte-level LM with 8 query heads of 12 dimensions on
tinyshakespeare (data/tinyshakespeare.txt, shipped with the repository), its SwiGLU
widened where K/V heads are removed so every point has exactly the parameters of the MHA
model (Shazeer 2019): each K/V head removed frees 2 x 12 x d_model weights per layer, 8
SwiGLU units of 3 x d_model. Sized so the four points train (350 steps of 16 x 256
tokens, ~3,500 tokens/s), evaluate and time their decoding in about 30 minutes on 2 CPU
cores. max_seq_len leaves room to time decoding at 1024 tokens of context (it adds no
parameters: positions are rotary).
"""

import pathlib

import ml_collections

from configs import default

TINYSHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def get_config():
    config = default.get_config()
    config.model.update(d_model=96, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=12,
                        mlp_dim=384, match_mha_params=True, max_seq_len=2048)
    config.train.update(steps=350, batch_size=16, seq_len=256, learning_rate=2e-3,
                        warmup_steps=35, log_every=25, eval_every=100, eval_batches=8)
    config.data.path = str(TINYSHAKESPEARE)
    config.checkpoint.every = 100
    config.sweep = ml_collections.ConfigDict({"model.num_kv_heads": [8, 4, 2, 1]},
                                             allow_dotted_keys=True)
    return config
