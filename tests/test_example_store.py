"""GradientStore's disk backing against its memory backing, its scratch folders, its held bytes, and
CountSketch's error against its bound."""

from __future__ import annotations

import gc
import math
import tempfile
from pathlib import Path

import pytest
import torch

from tensorscope_core.capture import tensor_bytes
from tensorscope_core.example_store import (
    Compression,
    CountSketch,
    GradientStore,
    StoreBacking,
    scratch_root,
    scratch_under,
)
from tensorscope_core.metric import _held_bytes

SIZE = 10_007  # not a multiple of the 256-entry chunks nor of the 4096-entry accumulation pieces
BATCHES = (4, 3, 5)
SMALL_BLOCK = 64 * 1024  # forces several column blocks (raw) and several row blocks (int8)


def _batches(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, SIZE, generator=gen, dtype=torch.float64) * 1e-3).to(dtype) for n in BATCHES]


def _store(batches: list[torch.Tensor], compression: Compression, backing: StoreBacking) -> GradientStore:
    store = GradientStore(SIZE, compression, backing)
    for rows in batches:
        store.add(rows)
    return store


@pytest.mark.parametrize("compression", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_disk_store_equals_memory_store_bit_for_bit(tmp_path: Path, compression: Compression,
                                                     dtype: torch.dtype) -> None:
    """Disk rows go through the same blocked products as memory rows, so every result is identical."""
    a, b = _batches(dtype, 0), _batches(dtype, 1)
    with scratch_under(tmp_path):
        disk_a, disk_b = _store(a, compression, "disk"), _store(b, compression, "disk")
    mem_a, mem_b = _store(a, compression, "memory"), _store(b, compression, "memory")
    for block in (SMALL_BLOCK, 256 * 2**20):
        assert torch.equal(disk_a.gram(block_bytes=block), mem_a.gram(block_bytes=block))
        assert torch.equal(disk_a.gram(power=2, block_bytes=block), mem_a.gram(power=2, block_bytes=block))
        assert torch.equal(disk_a.cross(disk_b, block_bytes=block), mem_a.cross(mem_b, block_bytes=block))
        assert torch.equal(disk_a.cross(mem_b, block_bytes=block), mem_a.cross(mem_b, block_bytes=block))
    assert torch.equal(disk_a.rows(2, 9), mem_a.rows(2, 9))
    assert torch.equal(disk_a.norms, mem_a.norms) and torch.equal(disk_a.errors, mem_a.errors)
    assert disk_a.stored_bytes == mem_a.stored_bytes


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_held_bytes_are_the_declared_ram(tmp_path: Path, compression: Compression) -> None:
    """``nbytes`` is what the core's walker counts; on disk it excludes the file, and no attribute
    exposes the rows as an array the walker would count instead."""
    n = sum(BATCHES)
    with scratch_under(tmp_path):
        disk = _store(_batches(torch.float32, 0), compression, "disk")
    memory = _store(_batches(torch.float32, 0), compression, "memory")
    for store, backing in ((disk, "disk"), (memory, "memory")):
        declared = GradientStore.declared_bytes(n, SIZE, compression, 4, backing)  # type: ignore[arg-type]
        assert store.nbytes == declared == _held_bytes(store, tensor_bytes)
    assert tensor_bytes(disk) == disk.nbytes  # walking its attributes finds no map of the file
    disk.gram()
    assert disk.nbytes == GradientStore.declared_bytes(n, SIZE, compression, 4, "disk")
    assert disk.nbytes < GradientStore.disk_bytes(n, SIZE, compression, 4)
    scales = sum(t.numel() * 4 for t in disk.scales)
    assert disk.stored_bytes == GradientStore.disk_bytes(n, SIZE, compression, 4) + scales


def test_scratch_folder_is_removed_by_close_and_by_collection(tmp_path: Path) -> None:
    with scratch_under(tmp_path):
        closed = _store(_batches(torch.float32, 0), "none", "disk")
        collected = _store(_batches(torch.float32, 0), "int8", "disk")
    assert len(list(tmp_path.iterdir())) == 2
    closed.close()
    closed.close()  # idempotent
    assert len(list(tmp_path.iterdir())) == 1 and len(closed) == sum(BATCHES)
    del collected
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_scratch_folder_is_removed_when_a_run_fails(tmp_path: Path) -> None:
    def failing_run() -> None:
        store = GradientStore(SIZE, "none", "disk")
        store.add(_batches(torch.float32, 0)[0])
        raise RuntimeError("the model failed")

    with scratch_under(tmp_path), pytest.raises(RuntimeError):
        failing_run()
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_scratch_root_defaults_to_the_temporary_folder_and_nests(tmp_path: Path) -> None:
    assert scratch_root() == Path(tempfile.gettempdir())
    with scratch_under(tmp_path / "outer") as outer:
        with scratch_under(tmp_path / "inner"):
            assert scratch_root() == tmp_path / "inner"
        assert scratch_root() == outer == tmp_path / "outer"
    assert scratch_root() == Path(tempfile.gettempdir())


def test_disk_store_refuses_zlib_and_mixed_dtypes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8"):
        GradientStore(SIZE, "int8_zlib", "disk")
    with scratch_under(tmp_path):
        store = GradientStore(SIZE, "none", "disk")
    store.add(torch.zeros(1, SIZE))
    with pytest.raises(ValueError, match="float32"):
        store.add(torch.zeros(1, SIZE, dtype=torch.float64))


@pytest.mark.parametrize("k", [1024, 4096])
def test_count_sketch_within_its_bound(k: int) -> None:
    """Count sketch S: entry j goes with sign s_j into bucket b_j. For vectors g, h,

        Sg . Sh - g . h = sum_{i != j, b_i = b_j} s_i s_j g_i h_j,

    which has mean 0 (E s_i s_j = 0 for i != j) and, as P(b_i = b_j) = 1/k and the products of
    distinct sign pairs are uncorrelated, variance
    (1/k) sum_{i != j} (g_i^2 h_j^2 + g_i h_i g_j h_j) = (||g||^2 ||h||^2 + (g . h)^2 - 2 sum_i g_i^2 h_i^2) / k
    <= 2 ||g||^2 ||h||^2 / k. So the error in units of ||g|| ||h|| has SD at most sqrt(2/k), and its
    mean square over pairs is at most 2/k in expectation: the RMS may exceed sqrt(2/k) only by
    sampling noise (1.5x allowed). The error is a sum over k buckets of nearly independent terms,
    close to normal, so exceeding 6 SDs has probability ~1e-9 per pair (Chebyshev alone: <= 1/36);
    every one of the 210 pairs (self pairs included) must be within 6 sqrt(2/k). Seeded.
    """
    n, size = 20, 50_000
    gen = torch.Generator().manual_seed(7)
    common = torch.randn(size, generator=gen, dtype=torch.float64)
    weights = torch.linspace(0, 1, n, dtype=torch.float64)[:, None]  # cosines from ~0 to ~0.7, and g . g
    rows = weights * common + torch.randn(n, size, generator=gen, dtype=torch.float64)
    sketch = CountSketch(size, k, seed=3)
    projected = sketch(rows)
    norms = rows.norm(dim=1)
    iu = torch.triu_indices(n, n)
    error = ((projected @ projected.T - rows @ rows.T) / (norms[:, None] * norms[None, :]))[iu[0], iu[1]]
    bound = math.sqrt(2 / k)
    assert sketch.std_bound == bound
    assert float(error.abs().max()) <= 6 * bound
    assert float(error.pow(2).mean().sqrt()) <= 1.5 * bound
