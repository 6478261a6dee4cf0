"""Uptraining SmolLM2-135M from 3 K/V heads to 1 (MQA) on tinyshakespeare, with its own tokenizer.

  python -m mqa.convert gguf --src SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2_uptrain/gqa3
  python -m mqa.convert uptrain --src runs/smollm2_uptrain/gqa3 --num_kv_heads 1 \\
      --workdir runs/smollm2_uptrain/init_mean
  python train.py --config=configs/uptrain_smollm2.py --workdir=runs/smollm2_uptrain/mean_200

(benchmarks/smollm2_uptrain.py runs all of it.) The model fields are SmolLM2-135M's (as
`mqa.convert gguf` writes them) with one K/V head; 200 steps of 4 x 256 tokens (205K
tokens, AdamW at a peak of 1e-4) take about 40 minutes of a 2-core CPU alone.
"""

import pathlib

from configs import default

TINYSHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def get_config():
    config = default.get_config()
    config.model.update(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=1,
                        head_dim=64, mlp_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                        attention_impl="einsum")  # the core the published runs trained with
    config.data.path = str(TINYSHAKESPEARE)
    config.data.tokenizer = "init_from"  # the converted model's own 49,152-token BPE
    config.train.init_from = "runs/smollm2_uptrain/init_mean"  # mqa.convert uptrain's output
    config.train.update(steps=200, batch_size=4, seq_len=256, learning_rate=1e-4, warmup_steps=20,
                        log_every=10, eval_every=50, eval_batches=8,
                        sampling="uniform")  # the windows the published runs trained on
    config.checkpoint.every = 50
    config.checkpoint.keep = 1
    return config
