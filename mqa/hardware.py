"""The peak matmul rate that model FLOPs utilisation (MFU) is measured against, and the
XLA options the train step is compiled with on this machine."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense peak FLOP/s per device from the vendors' data sheets; float32 matmuls on these
# GPUs run on tensor cores as TF32 under JAX's default precision.
DATASHEET_PEAK = {
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 7) -> float:
    """Median FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / float(np.median(times))


def peak_flops(dtype: str = "float32") -> float:
    """Peak FLOP/s of all devices of this run: data-sheet numbers for known GPUs, else
    the measured matmul rate (on CPU, simulated devices share one processor per host)."""
    device = jax.devices()[0]
    for name, peaks in DATASHEET_PEAK.items():
        if name in getattr(device, "device_kind", ""):
            return peaks[dtype] * jax.device_count()
    if device.platform == "cpu":
        return measured_matmul_flops(dtype) * jax.process_count()
    return measured_matmul_flops(dtype) * jax.device_count()


# XLA's CPU backend hands matmuls and elementwise chains to YNNPACK ("YNN fusions") by
# default. For the train step, XLA's own kernels were 6-11% faster here (the default
# config, 2 EPYC cores; benchmarks/train_throughput.py, side-by-side runs), so the train
# step turns them off. Decoding is left alone: there it was faster for some shapes and
# slower for others.
_CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def train_compiler_options() -> dict | None:
    """`compiler_options` for jitting the train step: YNNPACK fusions off on CPU, nothing
    elsewhere, and nothing where this JAX does not know the (experimental) option."""
    if jax.devices()[0].platform != "cpu":
        return None
    try:
        probe = jax.jit(lambda x: x + 1, compiler_options=_CPU_TRAIN_OPTIONS)
        probe(jnp.zeros(2)).block_until_ready()
    except Exception:  # noqa: BLE001 - an unknown option: compile as XLA's default
        return None
    return dict(_CPU_TRAIN_OPTIONS)
