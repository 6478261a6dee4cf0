"""Grouped attention over the KV cache through a C++ kernel on XLA's CPU backend
(`model.decode_impl="cpu_kernel"`): `cpu_decode.cc`, a `jax.ffi` custom call. Latent
attention's absorbed decoding is the same computation with one K/V head whose keys and
values are the cached rows (`latent.attend_latent_absorbed`); tied attention's keys add a
rotary part shared by the K/V heads (`attend_tied`).

XLA computes cached attention as two batched dot products (`core.attend`). For MQA at a
large batch each (row, K/V head) product is [positions, head_dim] against the group's G
query heads, a small matrix product that XLA's CPU dot runs at a third of the memory
bandwidth, and the [batch, heads, positions] scores leave the first product, are
transposed, normalised and read again by the second (docs/speed-targets.md). The kernel
reads each K/V head's keys and then its values once for all G query heads (and all query
positions of a prefill chunk), keeping one row's scores in cache, on XLA's intra-op
threads. It computes what `core.attend` computes (the same mask, `core.causal_mask`:
windows, rings, sinks, ragged rows), with float32 scores; the cache as it lies is its
operand (any reshape there would make XLA copy the whole cache at every step). int8 and
KIVI int4 caches are read as stored, without a dequantized copy (`attend_int4`). Where the
keys are also the values (latent attention's rows, tied attention's tied state: one
buffer), the positions go in chunks that stay in the processor's cache for both products,
merged by their softmax statistics, so the buffer is read from memory once, not twice.

The shared library is built with the system's C++ compiler (`$CXX`, default g++) on first
use, for this machine's processor, into ~/.cache/mqa (or $XDG_CACHE_HOME/mqa), keyed by
the source, the flags and the JAX version.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from mqa.attention.core import causal_mask
from mqa.errors import ConfigError

SOURCE = pathlib.Path(__file__).with_name("cpu_decode.cc")
TARGET = "mqa_cpu_decode_attend"
TARGET_INT8 = "mqa_cpu_decode_attend_int8"  # an int8 cache, read as stored
TARGET_TIED = "mqa_cpu_decode_attend_tied"  # tied attention: a second, shared part of each key
TARGET_TIED_INT8 = "mqa_cpu_decode_attend_tied_int8"
TARGET_INT4 = "mqa_cpu_decode_attend_int4"  # a KIVI int4 cache (`mqa.kv_int4`), read as stored
FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++20", "-shared", "-fPIC")


@functools.lru_cache(maxsize=1)
def register() -> pathlib.Path:
    """Builds the kernel (once per source, flags and JAX version) and registers it with
    XLA's CPU backend; returns the library's path. A ConfigError in one line where it
    cannot be built."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, jax.__version__)).encode())
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "mqa"
    library = cache / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)],
                           check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            lines = [line for line in detail.splitlines() if "error" in line] or detail.splitlines() or [""]
            raise ConfigError(f"model.decode_impl='cpu_kernel' could not build {SOURCE.name} with "
                              f"{compiler!r} ({lines[0].strip()}); use 'einsum'") from None
        partial.replace(library)  # atomic: another process may be building it too
    handlers = ctypes.cdll.LoadLibrary(str(library))
    for target, handler in ((TARGET, handlers.MqaCpuDecodeAttend),
                            (TARGET_INT8, handlers.MqaCpuDecodeAttendInt8),
                            (TARGET_TIED, handlers.MqaCpuDecodeAttendTied),
                            (TARGET_TIED_INT8, handlers.MqaCpuDecodeAttendTiedInt8),
                            (TARGET_INT4, handlers.MqaCpuDecodeAttendInt4)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return library


def _check_backend() -> None:
    if jax.default_backend() != "cpu":
        raise ConfigError(f"model.decode_impl='cpu_kernel' runs on the CPU, not on "
                          f"{jax.default_backend()!r}; use 'einsum'")


def _rows(q: jax.Array, kv: int) -> jax.Array:
    """q [b, t, h, d] -> float32 [b, kv, t * g, d]: each K/V head's query rows."""
    b, t, h, d = q.shape
    return q.astype(jnp.float32).reshape(b, t, kv, h // kv, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, -1, d)


def _unrows(out: jax.Array, q: jax.Array) -> jax.Array:
    """`_rows`' inverse: [b, kv, t * g, dv] -> [b, t, h, dv] in q's dtype."""
    b, t, h, _ = q.shape
    kv, dv = out.shape[1], out.shape[-1]
    return out.reshape(b, kv, t, h // kv, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dv).astype(q.dtype)


def chunked_tasks() -> int:
    """How many (row, K/V head) tasks this process has run through the kernel's one-pass path
    for keys that are also the values (latent attention's cached rows, tied attention's tied
    state): positions in chunks that stay in the processor's cache for both products."""
    count = ctypes.CDLL(str(register())).MqaCpuDecodeChunkedTasks
    count.restype = ctypes.c_int64
    return count()


def set_chunk_bytes(size: int) -> int:
    """Sets the size of those chunks in bytes (default 262,144; at least 16 positions are
    taken), for tests and tuning; returns the previous size."""
    setter = ctypes.CDLL(str(register())).MqaCpuDecodeSetChunkBytes
    setter.restype, setter.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return setter(size)


def compiler_found() -> bool:
    """Whether the C++ compiler that builds the kernel ($CXX, default g++) is installed."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | int | None = None,
           kv_layout: str = "bksd", window: jax.Array | int | None = None,
           k_positions: jax.Array | None = None, score_dim: int | None = None,
           sinks: int = 0, int8: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
           int4: dict[str, jax.Array] | None = None, value_dim: int | None = None) -> jax.Array:
    """`core.attend` over a cache, causal: q [b, t, h, d] float32; k, v float32 laid out as
    the cache holds them (`kv_layout` "bksd", or without "b" or "k" where that axis has
    size 1: heads before positions, always). Same arguments and result. int8: for an int8
    cache, ((k values, k scales), (v values, v scales)) as stored (`Keys.int8`), which the
    kernel reads instead of k and v: a quarter of the bytes, and no dequantized copy.
    int4: a KIVI int4 cache's buffers (`Keys.int4`, where `reads_int4` holds), read as
    stored in place of k and v (about a sixth of the bytes). value_dim: sum only each value
    row's first this many numbers (latent attention's rows end in a rotary key that is no
    value) -> [b, t, h, value_dim]."""
    _check_backend()
    if "s" not in kv_layout or kv_layout.index("s") != len(kv_layout) - 2:
        raise ValueError(f"cpu_kernel takes a cache layout with positions before the head dim, not {kv_layout!r}")
    mask = causal_mask(q.shape[1], k.shape[-2], q_offset, window, k_positions, sinks)
    if int4 is not None:
        # the residual's group holds the next position to write (`kv_int4.read_keys`)
        written = (0 if q_offset is None else q_offset) + q.shape[1]
        return attend_int4(q, int4, mask, score_dim or q.shape[-1], written=written)
    return attend_masked(q, k, v, mask, score_dim or q.shape[-1], int8, value_dim)


def reads_int4(buffers: dict[str, jax.Array]) -> bool:
    """Whether the kernel reads this int4 cache layer as stored: heads of 32, 64, 128 or 256
    numbers and value groups of channels a multiple of 32 (else it attends over the
    dequantized arrays)."""
    d = 2 * buffers["v"].shape[-1]
    return d in (32, 64, 128, 256) and (d // buffers["v_scale"].shape[-1]) % 32 == 0


def attend_int4(q: jax.Array, buffers: dict[str, jax.Array], mask: jax.Array, score_dim: int, *,
                written: jax.Array | int) -> jax.Array:
    """`attend_masked` over a KIVI int4 cache (`mqa.kv_int4`) as stored: buffers "k",
    "k_scale", "k_min", "k_residual", "v", "v_scale", "v_min" laid out as the entries
    ([b, kv, s, ...] in memory); positions ..written-1 written, so the key group holding
    `written` is the exact residual. mask bool [t, s] or [1, t, s] (no ragged rows)."""
    register()
    b, t, h, d = q.shape
    s = mask.shape[-1]
    kv = 2 * buffers["k"].size // (b * s * d)
    key_group = buffers["k_residual"].shape[-2]
    rows = _rows(q, kv)
    out = jax.ffi.ffi_call(TARGET_INT4, jax.ShapeDtypeStruct(rows.shape, jnp.float32))(
        rows, buffers["k"], buffers["k_scale"], buffers["k_min"],
        buffers["k_residual"].astype(jnp.float32), buffers["v"], buffers["v_scale"],
        buffers["v_min"], mask.reshape(1, t, s),
        ((jnp.asarray(written, jnp.int32) // key_group) * key_group).reshape(1),
        scale=np.float32(score_dim ** -0.5), groups=np.int64(h // kv),
        key_group=np.int64(key_group), value_group=np.int64(d // buffers["v_scale"].shape[-1]))
    return _unrows(out, q)


def attend_masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, score_dim: int,
                  int8: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
                  value_dim: int | None = None) -> jax.Array:
    """The kernel itself: softmax(q.k / sqrt(score_dim), where `mask`) v. q [b, t, h, d];
    k, v [b, kv, s, d] in memory (any shape holding that many numbers in that order, as a
    cache layout does); mask bool [t, s], or [1 or b, t, s]. int8: ((k int8, k scales
    [b, kv, s]), (v int8, v scales)) read in place of k and v, vector i being its int8
    values times its scale. A query that sees no key gets zeros. value_dim: each value
    row's first this many numbers summed (default d). -> [b, t, h, value_dim] in q's dtype,
    computed in float32."""
    register()
    b, t, h, d = q.shape
    s = mask.shape[-1]
    kv = k.size // (b * s * d)
    rows = _rows(q, kv)
    cache = (k, v) if int8 is None else (*(values for values, _ in int8), *(scales for _, scales in int8))
    out = jax.ffi.ffi_call(TARGET if int8 is None else TARGET_INT8,
                           jax.ShapeDtypeStruct((*rows.shape[:-1], value_dim or d), jnp.float32))(
        rows, *cache, mask.reshape(-1, t, s), scale=np.float32(score_dim ** -0.5),
        groups=np.int64(h // kv))
    return _unrows(out, q)


def attend_tied(q: jax.Array, tied: jax.Array, k_rope: jax.Array, *, tied_layout: str = "bksd",
                q_offset: jax.Array | int = 0, window: jax.Array | int | None = None,
                k_positions: jax.Array | None = None, sinks: int = 0,
                int8: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None
                ) -> jax.Array:
    """`tied.attend_tied` over a cache: q [b, t, h, d] (its last d/2 dimensions rotated);
    tied [.., s, d] as the cache holds it; k_rope [(b,) s, d/2], shared by the K/V heads.
    Head k's key at s is [tied[s, k, :n], k_rope[s]], its value tied[s, k]: the kernel
    meets the first n numbers of the tied state with the queries' first n dimensions (the
    XLA form meets the whole state with the rest zeroed) and the shared rotary key with
    their last d/2. int8: ((tied int8, scales), (k_rope int8, scales)) as stored."""
    _check_backend()
    register()
    b, t, h, d = q.shape
    s, r = tied.shape[-2], k_rope.shape[-1]
    kv = tied.size // (b * s * d)
    mask = causal_mask(t, s, q_offset, window, k_positions, sinks).reshape(-1, t, s)
    rows = _rows(q, kv)
    first, rotary = rows[..., :d - r], rows[..., d - r:]
    cache = (tied, k_rope) if int8 is None else (*(x for x, _ in int8), *(scales for _, scales in int8))
    out = jax.ffi.ffi_call(TARGET_TIED if int8 is None else TARGET_TIED_INT8,
                           jax.ShapeDtypeStruct(rows.shape, jnp.float32))(
        first, rotary, *cache, mask, scale=np.float32(d ** -0.5), groups=np.int64(h // kv))
    return _unrows(out, q)
