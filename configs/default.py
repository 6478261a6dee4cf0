"""The base experiment: a 4-layer, d_model 256 byte-level LM with multi-head attention.

Every other config overrides a few fields of this one, and every config is checked
against this schema when it is loaded (unknown keys and wrong types are errors).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict(dict(
        vocab_size=256,          # byte-level by default; a BPE tokenizer sets its own size
        d_model=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,          # == num_heads: MHA; 1: MQA; in between: GQA
        kv_share_every=1,        # layers per group sharing one K/V (Brandon et al. 2024); 1: off
        attention="grouped",     # grouped (MHA/GQA/MQA) | tied (GTA) | latent (MLA): mqa/attention/
        kv_latent_dim=0,         # latent: numbers per token of the cached K/V latent
        q_latent_dim=0,          # latent: > 0 gives low-rank queries through a latent this wide
        rope_head_dim=0,         # latent: rotary dims of the shared key and of each query head;
                                 # grouped: > 0 rotates only the last this many of each head (even, < head_dim), 0 all
        rope_key_heads=1,        # latent: rotary keys per token (1: DeepSeek's one shared key; more: query heads in groups)
        rope_frequency_dim=0,    # latent: > 0: the rotary part turns at the highest frequencies of a head this wide
                                 # (what a converted model's kept dimensions turned at); 0: frequencies over rope_head_dim
        rope_pairs=[],           # latent: per layer and rotary key, the frequency index (0..D/2-1, D as above or
                                 # rope_head_dim) of each rotary pair, flattened [num_layers, rope_key_heads,
                                 # rope_head_dim/2] (a conversion's per-head choice); []: 0..rope_head_dim/2-1
        kv_latent_norm=True,     # latent: RMS-normalise the cached latent (DeepSeek); false: linear (converted models)
        qk_nope_dim=0,           # latent: numbers in each query's and expanded key's non-rotary part (DeepSeek's
                                 # qk_nope_head_dim); 0: head_dim (per-head rotary conversions: head_dim - rope_head_dim)
        sliding_window=0,        # > 0: layers attend to the last this many positions (ring-buffer cache)
        attention_sinks=0,       # with a window: the first this many positions stay visible (and cached)
        global_every=0,          # with a window, every N-th layer stays global; 0: all layers local
        kv_cache_dtype="",       # '': the compute dtype; int8: absmax-quantized per token and head;
                                 # int4: KIVI (keys per channel, values per token, in groups)
        kv_quant_group=32,       # int4: tokens per key group and channels per value group
        head_dim=32,             # any even size; num_heads * head_dim need not equal d_model
        mlp_dim=1024,            # the gated MLP's hidden width
        mlp_activation="silu",   # silu: SwiGLU (Llama) | gelu_tanh: GeGLU, tanh-approximated GELU (Gemma)
        match_mha_params=False,  # widen the MLP so parameters equal MHA's (Shazeer 2019)
        tie_embeddings=True,
        attention_impl="tiled",  # tiled (causal query tiles) | einsum | blockwise (linear memory) | xla | cudnn
        decode_impl="einsum",    # attention over the KV cache (prefill, decoding): einsum (XLA's dot products)
                                 # | cpu_kernel (C++ via jax.ffi, each K/V head read once for its group; CPU, float32)
        attention_block=64,      # tiled: query tile length; blockwise: block length
        rope_theta=10000.0,
        rope_local_theta=0.0,    # > 0: the RoPE base of local (sliding-window) layers (Gemma 3: 10000); 0: rope_theta
        rope_global_every=0,     # with rope_local_theta: > 0: every N-th layer takes rope_theta, the others the local
                                 # base, whatever their window (a retrofit with fewer global layers); 0: as global_every
        norm_eps=1e-5,
        norm_scale="weight",     # RMSNorm multiplier: weight (Llama) | one_plus_weight: 1 + weight, weight from 0 (Gemma)
        qk_norm=False,           # RMSNorm over each query and key head before RoPE (Gemma 3; grouped attention)
        post_norms=False,        # also norm each attention and MLP output before its residual add (Gemma's sandwich)
        embed_scale=False,       # multiply the input embeddings by sqrt(d_model) (Gemma)
        attention_score_dim=0,   # > 0: scores are q.k / sqrt(this) (Gemma's query_pre_attn_scalar); 0: head_dim
        max_seq_len=1024,
        dtype="float32",         # compute dtype; parameters stay float32
        remat=False,             # recompute each layer's activations in the backward pass
        scan_unroll=4,           # layers (groups) per scan iteration; >= num_layers: unrolled
    ))

    config.train = ml_collections.ConfigDict(dict(
        steps=2000,
        batch_size=16,
        seq_len=256,
        learning_rate=1e-3,
        min_learning_rate_ratio=0.1,  # cosine decays to this fraction of the peak
        warmup_steps=100,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum=1,
        seed=0,
        sampling="permutation",  # window starts: permutation (each once per pass) | uniform (with replacement)
        log_every=20,
        eval_every=200,
        eval_batches=16,         # batches of held-out windows scored at each evaluation
        final_eval_tokens=1_000_000,  # held-out tokens scored at the end (all of a smaller split)
        max_nonfinite_steps=10,  # stop after this many updates in a row skipped for NaN/inf
        init_from="",            # workdir or checkpoint to start from (uptraining); '': random
        trainable="all",         # all | attention (train only the attention weights)
        distill_from="",         # a teacher workdir: train towards its next-token distributions
        distill_weight=1.0,      # with distill_from: loss = w * KL(teacher || model) + (1 - w) * LM loss
    ))

    config.data = ml_collections.ConfigDict(dict(
        path="",              # local text file or folder; '' and no hf_name: CPython's docs
        hf_name="",           # Hugging Face hub dataset, e.g. 'roneneldan/TinyStories'
        hf_config="",         # the dataset's configuration, if it has several
        tokenizer="byte",     # byte | bpe | init_from (train.init_from's) | a tokenizer.json or its folder
        bpe_vocab_size=1024,
        bpe_train_bytes=100_000_000,  # BPE learns its merges on at most this much train text
        heldout_fraction=0.1,  # a text file's tail; of .jsonl/.parquet/hub documents, whole ones
        text_column="text",   # the documents' column in .jsonl/.parquet files and hub datasets
        token_dir="",         # where token files go; '': WORKDIR/data (several runs may share one)
        strict=False,         # rows of .jsonl/.parquet/hub documents without text: an error, not dropped
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3))

    # Device mesh; -1 fills the devices the other axes leave.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
