"""A seconds-long smoke test: 2 layers, d_model 64, 4 query heads sharing 2 KV heads."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_dim=192, max_seq_len=128)
    config.train.update(steps=300, batch_size=16, seq_len=64, learning_rate=3e-3,
                        warmup_steps=30, log_every=25, eval_every=100, eval_batches=8)
    config.checkpoint.every = 100
    return config
