"""Shared test fixtures: the repository root and the shared data folder beside it."""

import pathlib

import jax
import pytest

# Tests check the mathematics: on GPUs, float32 matmuls would otherwise use TF32 (10-bit
# mantissa). No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path
