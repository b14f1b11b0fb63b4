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

Projection (``CountSketch``): entry j of a vector is added, with a random sign s_j, into
bucket b_j of k buckets (b, s drawn from a seeded generator, the same for every vector
of a run). The sketch is unbiased for dot products, E[Sg . Sh] = g . h, with variance at
most 2 ||g||^2 ||h||^2 / k.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

Compression = Literal["none", "int8", "int8_zlib"]
CHUNK = 256
ZLIB_LEVEL = 6


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
    """Rows of flat gradient vectors, appended a batch at a time.

    Every tensor it holds is an attribute (or inside a list attribute), so the core's
    measured state of a metric that owns a store counts it.
    """

    AUX_BYTES = 16  # per vector: exact norm and relative reconstruction error (float64)

    def __init__(self, size: int, compression: Compression = "none") -> None:
        self.size = size
        self.compression = compression
        self.parts: list[torch.Tensor] = []  # none: [n, P] in the gradients' dtype; int8: [n, P_padded]
        self.scales: list[torch.Tensor] = []
        self.blobs: list[torch.Tensor] = []  # int8_zlib: one uint8 tensor per vector
        self.norms = torch.zeros(0, dtype=torch.float64)
        self.errors = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.norms.shape[0])

    @classmethod
    def declared_bytes(cls, n: int, size: int, compression: Compression, dtype_bytes: int) -> int:
        return n * (bytes_per_vector(size, compression, dtype_bytes) + cls.AUX_BYTES)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().cpu()
        exact = rows.double()
        norms = exact.norm(dim=1)
        if self.compression == "none":
            self.parts.append(rows.clone())
            errors = torch.zeros(rows.shape[0], dtype=torch.float64)
        else:
            q, scales = quantize(rows)
            back = dequantize(q, scales, self.size)
            errors = (back - exact).norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
            self.scales.append(scales)
            if self.compression == "int8":
                self.parts.append(q)
            else:
                for row in q:
                    packed = zlib.compress(row.numpy().tobytes(), ZLIB_LEVEL)
                    self.blobs.append(torch.frombuffer(bytearray(packed), dtype=torch.uint8))
        self.norms = torch.cat([self.norms, norms])
        self.errors = torch.cat([self.errors, errors])

    def _q_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.compression == "int8":
            return _slice(self.parts, start, stop)
        rows = [np.frombuffer(zlib.decompress(b.numpy().tobytes()), dtype=np.int8) for b in self.blobs[start:stop]]
        return torch.from_numpy(np.stack(rows).copy()) if rows else torch.zeros(0, 0, dtype=torch.int8)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The (reconstructed) vectors ``start:stop`` in float64."""
        stop = len(self) if stop is None else stop
        if self.compression == "none":
            return _slice(self.parts, start, stop).double() if self.parts else torch.zeros(0, self.size)
        scales = _slice(self.scales, start, stop)
        return dequantize(self._q_rows(start, stop), scales, self.size)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(self), block_rows):
            yield start, self.rows(start, min(start + block_rows, len(self)))

    def gram(self, power: int = 1, block_bytes: int = 256 * 2**20) -> torch.Tensor:
        """All pairwise dot products of the stored (reconstructed) vectors, raised entrywise to
        ``power`` first (2: sum_k g_ik^2 g_jk^2), float64 [n, n]."""
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

    def cross(self, other: GradientStore, block_bytes: int = 256 * 2**20) -> torch.Tensor:
        """Dot products of this store's vectors with ``other``'s, float64 [n_self, n_other]."""
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
        rows = rows.detach().cpu()
        out = torch.zeros(rows.shape[0], self.k, dtype=torch.float64)
        for index, start in enumerate(range(0, self.size, self.SPAN)):
            stop = min(start + self.SPAN, self.size)
            bucket, sign = self._span(index, stop - start)
            out.index_add_(1, bucket, rows[:, start:stop].double() * sign)
        return out

    @property
    def std_bound(self) -> float:
        """Bound on the standard deviation of the sketched dot product, in units of ||g|| ||h||."""
        return math.sqrt(2.0 / self.k)
