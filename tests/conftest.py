"""Shared test fixtures: the repository root, its shipped corpora and a compilation cache."""

import os
import pathlib

import jax
import pytest

# Tests check the mathematics: on GPUs, float32 matmuls would otherwise use TF32 (10-bit
# mantissa). No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # corpora the repository ships (data/SOURCES.md)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache shared by the session's train.py, eval.py and
    sweep.py subprocesses, which compile the same tiny programs many times (a tiny
    train.py run: 15 s cold, 5 s from the cache), by the test processes themselves, and
    by all of them under pytest-xdist. Subprocesses inherit the environment. A size limit turns on JAX's file
    lock around the cache, so that two processes never read an entry half written."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is under one session's
        root = root.parent
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2 ** 30))
    # This process read the environment when it imported JAX: the same settings for it.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


@pytest.fixture
def fast_compile():
    """XLA without its slow optimization passes for this test (`helpers.fast_compile`);
    a module takes it with `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    from helpers import fast_compile
    with fast_compile():
        yield


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for this test: its tensors here are tiny, and its idle threads
    spin against JAX's compiler for the two cores (3x the CPU time)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
    path = DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run first: with several test processes (pytest-xdist hands out
    tests in this order) the longest ones then start early instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
