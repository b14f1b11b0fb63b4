"""Keeping many gradient vectors: raw, int8-quantised, int8 + zlib, or count-sketch projected.

Quantisation (modes ``int8`` and ``int8_zlib``): each vector is cut into chunks of
``CHUNK`` = 256 entries; a chunk with largest magnitude a is stored as
q = round(x * 127 / a) in int8 with the float32 scale a / 127, so every entry is off by at
most half a scale step. ``int8_zlib`` additionally deflates the int8 bytes (zlib level 6),
lossless. For each vector the store keeps its exact norm ||g|| and its relative
reconstruction error eps = ||g - g~|| / ||g||. Cosines are estimated as
g~ . h~ / (||g|| ||h||); by Cauchy-Schwarz

    |g~ . h~ - g . h| <= (eps_g + eps_h + eps_g * eps_h) ||g|| ||h||,

which is the error bound the metrics report.

Sums over the entries of a vector (norms, dot products) are float64-accurate: vectors in
float64 are multiplied in float64; vectors in a lower precision are multiplied in float32
over pieces of ``ACC_CHUNK`` = 4096 entries, and the pieces are summed in float64 (as
the core's ``sum_of_squares`` does), which measured ~4e-9 x ||g|| ||h|| from a
float64 product on 5.3 M-entry gradients at float32 speed (a float64 product was ~25x slower,
a plain float32 one off by ~4e-6).

Projection (``CountSketch``): entry j of a vector is added, with a random sign s_j, into
bucket b_j of k buckets (b, s drawn from a seeded generator, the same for every vector
of a run). The sketch is unbiased for dot products, E[Sg . Sh] = g . h, with variance at
most 2 ||g||^2 ||h||^2 / k.

Backing (``StoreBacking``): a store keeps its rows (the raw rows, or the int8 codes) in RAM
(``memory``) or in a file (``disk``) in a fresh folder under ``scratch_root()`` (the system's
temporary folder unless a ``scratch_under(path)`` block names another, as the core's runner
does with the run's cache dir). Rows are appended to the file as bytes and read back through a
``numpy.memmap`` of its current length, by the same blocked products as in RAM, so the
results are bit for bit those of a memory store. Only the per-row norms, errors and int8
scales stay in RAM (``nbytes``); ``close()`` removes the folder, and so does a
``weakref.finalize`` when the store is collected (a run that fails midway leaves nothing).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch

Compression = Literal["none", "int8", "int8_zlib"]
#: where a store keeps its rows: in RAM, or in a memory-mapped file under the run's cache dir
StoreBacking = Literal["memory", "disk"]
CHUNK = 256
ZLIB_LEVEL = 6
ACC_CHUNK = 4096  # entries multiplied in float32 before the float64 sum
BLOCK_BYTES = 256 * 2**20  # column block of the stored vectors gathered at a time by the dot products


_scratch: list[Path] = []  # the folders of the open ``scratch_under`` blocks, innermost last


def scratch_root() -> Path:
    """The folder under which disk-backed stores make their scratch folders."""
    return _scratch[-1] if _scratch else Path(tempfile.gettempdir())


@contextmanager
def scratch_under(path: str | Path) -> Iterator[Path]:
    """Make disk-backed stores created inside the block put their files under ``path`` (created if missing)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _scratch.append(root)
    try:
        yield root
    finally:
        _scratch.pop()


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype != torch.float64


def row_squares(rows: torch.Tensor) -> torch.Tensor:
    """||row||^2 of each row of ``rows`` [n, P] in float64 (float64-accurate, see the module docstring)."""
    rows = rows.detach()
    if not _low_precision(rows):
        return torch.linalg.vector_norm(rows, dim=1).square()
    rows = rows.float().contiguous()
    n, size = rows.shape
    pieces, whole = size // ACC_CHUNK, size // ACC_CHUNK * ACC_CHUNK
    out = torch.zeros(n, dtype=torch.float64)
    if pieces:
        view = rows.as_strided((n, pieces, ACC_CHUNK), (size, ACC_CHUNK, 1))
        out += torch.linalg.vector_norm(view, dim=2).double().square().sum(dim=1)
    if whole < size:
        out += torch.linalg.vector_norm(rows[:, whole:].double(), dim=1).square()
    return out


def _block_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, w] . b [m, w]^T in float64 (both contiguous, the same dtype)."""
    if not _low_precision(a):
        return a @ b.T
    n, width = a.shape
    m = b.shape[0]
    pieces, whole = width // ACC_CHUNK, width // ACC_CHUNK * ACC_CHUNK
    out = torch.zeros(n, m, dtype=torch.float64)
    if pieces:
        av = a.as_strided((pieces, n, ACC_CHUNK), (ACC_CHUNK, width, 1))
        bv = b.as_strided((pieces, ACC_CHUNK, m), (ACC_CHUNK, 1, width))
        out += torch.bmm(av, bv).double().sum(dim=0)
    if whole < width:
        out += a[:, whole:].double() @ b[:, whole:].double().T
    return out


def dot_products(a_parts: list[torch.Tensor], b_parts: list[torch.Tensor] | None, size: int,
                 block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """All dot products of the rows of ``a_parts`` (row-wise concatenated) with those of
    ``b_parts`` (None: ``a_parts`` again), float64 [n, m].

    Works through the columns in blocks: each block of every row is gathered once (the rows
    are read once whatever their number), in float32 unless any part is float64.
    """
    same = b_parts is None
    b_list = a_parts if b_parts is None else b_parts
    n, m = sum(p.shape[0] for p in a_parts), sum(p.shape[0] for p in b_list)
    out = torch.zeros(n, m, dtype=torch.float64)
    if n == 0 or m == 0 or size == 0:
        return out
    dtype = torch.float64 if not all(_low_precision(p) for p in [*a_parts, *b_list]) else torch.float32
    rows = n if same else n + m
    width = max(ACC_CHUNK, block_bytes // (rows * 8) // ACC_CHUNK * ACC_CHUNK)
    for start in range(0, size, width):
        stop = min(size, start + width)
        a = torch.cat([p[:, start:stop].to(dtype) for p in a_parts])
        b = a if same else torch.cat([p[:, start:stop].to(dtype) for p in b_list])
        out += _block_dots(a, b)
    return out


def n_chunks(size: int) -> int:
    return -(-size // CHUNK)


def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, P] -> (int8 [n, n_chunks * CHUNK], float32 scales [n, n_chunks])."""
    n, size = rows.shape
    padded = torch.zeros(n, n_chunks(size) * CHUNK, dtype=torch.float64)
    padded[:, :size] = rows.double()
    chunks = padded.view(n, -1, CHUNK)
    scales = (chunks.abs().amax(dim=2) / 127.0).float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).double()
    q = torch.round(chunks / safe[:, :, None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, -1), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, size: int) -> torch.Tensor:
    n = q.shape[0]
    return (q.view(n, -1, CHUNK).double() * scales.double()[:, :, None]).view(n, -1)[:, :size]


def bytes_per_vector(size: int, compression: Compression, dtype_bytes: int) -> int:
    """What one stored vector holds (the zlib mode: an upper bound, the int8 size)."""
    if compression == "none":
        return size * dtype_bytes
    return n_chunks(size) * CHUNK + 4 * n_chunks(size)


class GradientStore:
    """Rows of flat gradient vectors, appended a batch at a time, in RAM or on disk (``backing``).

    ``nbytes`` is the RAM it holds (the core's measured state of a metric that owns a store
    reads it): with disk backing the per-row norms, errors and int8 scales only. Call
    ``close()`` when done: it drops the rows (removes the disk folder); the norms and errors stay.
    """

    AUX_BYTES = 16  # per vector: exact norm and relative reconstruction error (float64)

    def __init__(self, size: int, compression: Compression = "none", backing: StoreBacking = "memory") -> None:
        if backing == "disk" and compression == "int8_zlib":
            raise ValueError("a disk-backed store keeps raw rows or int8 codes: use compression 'none' or 'int8'")
        self.size = size
        self.compression = compression
        self.backing = backing
        self.parts: list[torch.Tensor] = []  # memory: none: [n, P] in the gradients' dtype; int8: [n, P_padded]
        self.scales: list[torch.Tensor] = []
        self.blobs: list[torch.Tensor] = []  # int8_zlib: one uint8 tensor per vector
        self.norms = torch.zeros(0, dtype=torch.float64)
        self.errors = torch.zeros(0, dtype=torch.float64)
        self._dtype: torch.dtype | None = None  # disk: the dtype of the rows in the file, once one is written
        self._file: Path | None = None
        self._remove: weakref.finalize | None = None
        if backing == "disk":
            folder = Path(tempfile.mkdtemp(prefix="tensorscope-store-", dir=scratch_root()))
            self._file = folder / "rows.bin"
            self._remove = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def __len__(self) -> int:
        return int(self.norms.shape[0])

    @classmethod
    def declared_bytes(cls, n: int, size: int, compression: Compression, dtype_bytes: int,
                       backing: StoreBacking = "memory") -> int:
        """RAM ``n`` vectors take (``nbytes``); the zlib mode: an upper bound, the int8 size."""
        if backing == "disk":
            return n * (cls.AUX_BYTES + (0 if compression == "none" else 4 * n_chunks(size)))
        return n * (bytes_per_vector(size, compression, dtype_bytes) + cls.AUX_BYTES)

    @classmethod
    def disk_bytes(cls, n: int, size: int, compression: Compression, dtype_bytes: int) -> int:
        """Bytes of the file of ``n`` vectors with disk backing (raw rows, or int8 codes)."""
        return n * (size * dtype_bytes if compression == "none" else n_chunks(size) * CHUNK)

    @staticmethod
    def disk_room() -> int:
        """Free bytes on the file system of ``scratch_root()``, where a disk-backed store would write."""
        root = scratch_root()
        while not root.exists():
            root = root.parent
        return shutil.disk_usage(root).free

    @property
    def nbytes(self) -> int:
        """RAM held: the rows (memory backing), the scales, norms and errors."""
        tensors = [*self.parts, *self.scales, *self.blobs, self.norms, self.errors]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def stored_bytes(self) -> int:
        """Bytes the kept rows take, in RAM or in the file (scales included)."""
        if self._file is None:
            return sum(t.numel() * t.element_size() for t in [*self.parts, *self.scales, *self.blobs])
        return self._file_bytes() + sum(t.numel() * t.element_size() for t in self.scales)

    def add(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep ``rows`` [n, size]; returns their exact squared norms (float64 [n]).

        Uncompressed rows in RAM are kept as given, without a copy: do not modify them afterwards.
        """
        rows = rows.detach().cpu()
        squares = row_squares(rows)
        norms = squares.sqrt()
        if self.compression == "none":
            self._keep(rows)
            errors = torch.zeros(rows.shape[0], dtype=torch.float64)
        else:
            exact = rows.double()
            q, scales = quantize(rows)
            back = dequantize(q, scales, self.size)
            errors = (back - exact).norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
            self.scales.append(scales)
            if self.compression == "int8":
                self._keep(q)
            else:
                for row in q:
                    packed = zlib.compress(row.numpy().tobytes(), ZLIB_LEVEL)
                    self.blobs.append(torch.frombuffer(bytearray(packed), dtype=torch.uint8))
        self.norms = torch.cat([self.norms, norms])
        self.errors = torch.cat([self.errors, errors])
        return squares

    def _keep(self, rows: torch.Tensor) -> None:
        """Keep stored rows (raw or int8 codes): in ``parts``, or appended to the file."""
        if self._file is None:
            self.parts.append(rows)
            return
        if self._dtype is not None and rows.dtype != self._dtype:
            raise ValueError(f"a disk-backed store holds {self._dtype} rows, got {rows.dtype}")
        self._dtype = rows.dtype
        with open(self._file, "ab") as f:
            f.write(rows.contiguous().view(torch.uint8).numpy().tobytes())

    def _file_bytes(self) -> int:
        return self._file.stat().st_size if self._file is not None and self._file.exists() else 0

    def _stored(self) -> list[torch.Tensor]:
        """The stored rows as ``parts``: a memory store's own, or one copy-on-write map of the file
        (made per call, never kept: the map is not RAM the store holds)."""
        if self._file is None or self._dtype is None:
            return self.parts
        n, nbytes = len(self), self._file_bytes()
        if nbytes == 0:  # zero-length rows: nothing to map
            return [torch.zeros(n, 0, dtype=self._dtype)]
        mapped = np.memmap(self._file, dtype=np.uint8, mode="c", shape=(n, nbytes // n))
        return [torch.from_numpy(mapped).view(self._dtype)]

    def close(self) -> None:
        """Drop the rows (a disk store removes its folder); norms and errors stay."""
        self.parts, self.blobs, self._dtype = [], [], None
        if self._remove is not None:
            self._remove()

    def _q_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.compression == "int8":
            return _slice(self._stored(), start, stop)
        rows = [np.frombuffer(zlib.decompress(b.numpy().tobytes()), dtype=np.int8) for b in self.blobs[start:stop]]
        return torch.from_numpy(np.stack(rows).copy()) if rows else torch.zeros(0, 0, dtype=torch.int8)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The (reconstructed) vectors ``start:stop`` in float64."""
        stop = len(self) if stop is None else stop
        if self.compression == "none":
            parts = self._stored()
            return _slice(parts, start, stop).double() if parts else torch.zeros(0, self.size)
        scales = _slice(self.scales, start, stop)
        return dequantize(self._q_rows(start, stop), scales, self.size)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(self), block_rows):
            yield start, self.rows(start, min(start + block_rows, len(self)))

    def gram(self, power: int = 1, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
        """All pairwise dot products of the stored (reconstructed) vectors, raised entrywise to
        ``power`` first (2: sum_k g_ik^2 g_jk^2), float64 [n, n]."""
        if self.compression == "none" and power == 1:
            return dot_products(self._stored(), None, self.size, block_bytes)
        n = len(self)
        out = torch.zeros(n, n, dtype=torch.float64)
        block = max(1, block_bytes // max(1, 8 * self.size))
        for i, a in self.blocks(block):
            a = a.pow(power) if power != 1 else a
            for j, b in self.blocks(block):
                if j >= i:
                    b = b.pow(power) if power != 1 else b
                    prod = a @ b.T
                    out[i:i + len(a), j:j + len(b)] = prod
                    out[j:j + len(b), i:i + len(a)] = prod.T
        return out

    def cross(self, other: GradientStore, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
        """Dot products of this store's vectors with ``other``'s, float64 [n_self, n_other]."""
        if self.compression == "none" and other.compression == "none":
            return dot_products(self._stored(), other._stored(), self.size, block_bytes)
        out = torch.zeros(len(self), len(other), dtype=torch.float64)
        block = max(1, block_bytes // max(1, 8 * self.size))
        for i, a in self.blocks(block):
            for j, b in other.blocks(block):
                out[i:i + len(a), j:j + len(b)] = a @ b.T
        return out

    def cosine_error_bound(self) -> torch.Tensor:
        """[n, n] bound on |estimated - exact| cosine of each pair (0 without compression)."""
        e = self.errors
        return e[:, None] + e[None, :] + e[:, None] * e[None, :]


def _slice(parts: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the row-wise concatenation of ``parts``, copying only those rows."""
    out, offset = [], 0
    for part in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
        if lo < hi:
            out.append(part[lo:hi])
        offset += part.shape[0]
    return torch.cat(out) if out else parts[0][:0]


class CountSketch:
    """A seeded count-sketch projection of P-dimensional vectors onto k dimensions.

    Buckets and signs are drawn afresh for each span of ``SPAN`` entries from a generator
    seeded with (seed, span index), so nothing of size P is kept between calls and every
    call (every batch, every checkpoint of a run with the same seed) uses the same sketch.
    """

    SPAN = 1 << 20

    def __init__(self, size: int, k: int, seed: int) -> None:
        self.size = size
        self.k = k
        self.seed = seed

    def _span(self, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        bucket = torch.randint(self.k, (length,), generator=gen)
        sign = torch.randint(2, (length,), generator=gen).double() * 2 - 1
        return bucket, sign

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """The sketch [n, k] (float64, on the CPU) of the rows [n, size]."""
        return self.of_parts([rows])

    def of_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sketch of the rows that ``parts`` [n, w_i] make side by side (widths summing to ``size``),
        never concatenated: each part is added span by span as it lies, so a vector given one parameter's
        gradient at a time is sketched with nothing of its full size. The additions into each bucket are
        the same, in the same order, as for the concatenation."""
        n = parts[0].shape[0] if parts else 0
        out = torch.zeros(n, self.k, dtype=torch.float64)
        drawn: tuple[int, torch.Tensor, torch.Tensor] | None = None
        offset = 0
        for part in parts:
            part = part.detach().reshape(n, -1)
            column, end = offset, offset + part.shape[1]
            while column < end:
                index = column // self.SPAN
                start = index * self.SPAN
                if drawn is None or drawn[0] != index:
                    drawn = (index, *self._span(index, min(self.SPAN, self.size - start)))
                stop = min(start + self.SPAN, end)
                _, bucket, sign = drawn
                piece = part[:, column - offset:stop - offset].cpu().double()
                out.index_add_(1, bucket[column - start:stop - start], piece * sign[column - start:stop - start])
                column = stop
            offset = end
        if offset != self.size:
            raise ValueError(f"the parts hold {offset} entries, the sketch takes {self.size}")
        return out

    @property
    def std_bound(self) -> float:
        """Bound on the standard deviation of the sketched dot product, in units of ||g|| ||h||."""
        return math.sqrt(2.0 / self.k)
