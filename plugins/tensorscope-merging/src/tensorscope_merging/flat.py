"""Model-sized arithmetic in bounded slices, so that no flat copy of a model is ever held.

A model's parameters are walked one ``Piece`` (a slice of one flattened parameter) at a time;
``WorkBlock`` is the one preallocated [rows, width] block every piece of every member is
written into (one row per member), and ``kth_smallest`` finds the k-th smallest magnitude over
all pieces by radix selection on the floats' bits: exactly ``torch.kthvalue`` of the whole
flat vector, with memory of one block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from tensorscope_core.plugin_api import ModelView

#: entries of the working block: 4 Mi entries (16 MiB in float32, 32 MiB in float64) whatever the members
WORK_ENTRIES = 1 << 22

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DIGIT = 16  # bits resolved per radix pass


def work_entries(view: ModelView) -> int:
    """Entries of the working block on this model: ``WORK_ENTRIES``, or the model's size when smaller."""
    return min(WORK_ENTRIES, view.n_params)


@dataclass(frozen=True)
class Piece:
    """Entries ``start:stop`` of the flattened parameter ``name``."""

    name: str
    start: int
    stop: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor`` (a view of it: writing to it writes the tensor)."""
        return tensor.view(-1)[self.start:self.stop]

    @property
    def size(self) -> int:
        return self.stop - self.start


def pieces(like: Mapping[str, torch.Tensor], width: int) -> Iterator[Piece]:
    """Every parameter of ``like`` in order, cut into pieces of at most ``width`` entries."""
    for name, tensor in like.items():
        for start in range(0, tensor.numel(), width):
            yield Piece(name, start, min(tensor.numel(), start + width))


class WorkBlock:
    """One [rows, width] block, allocated once, that pieces are written into (``entries`` in all)."""

    def __init__(self, rows: int, entries: int, dtype: torch.dtype, device: torch.device) -> None:
        self.width = max(1, entries // rows)
        self.data = torch.empty(rows, self.width, dtype=dtype, device=device)

    def differences(self, piece: Piece, members: Sequence[Mapping[str, torch.Tensor]],
                    base: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[members, piece]: ``member - base`` on the piece, taken in the parameters' dtype and then
        cast to the block's (as ``(theta - base).to(dtype)`` would)."""
        block = self.data[:len(members), :piece.size]
        for row, member in zip(block, members, strict=True):
            torch.sub(piece.of(member[piece.name]), piece.of(base[piece.name]), out=row)
        return block

    def values(self, piece: Piece, tensors: Sequence[Mapping[str, torch.Tensor]], first_row: int = 0,
               shift: float = 0.0) -> torch.Tensor:
        """[tensors, piece] from row ``first_row``: each tensor's piece cast to the block's dtype, plus ``shift``."""
        block = self.data[first_row:first_row + len(tensors), :piece.size]
        for row, tensor in zip(block, tensors, strict=True):
            row.copy_(piece.of(tensor[piece.name]))
            if shift:
                row.add_(shift)
        return block


def kth_smallest(blocks: Callable[[], Iterable[torch.Tensor]], ks: Sequence[int]) -> torch.Tensor:
    """Row r's ``ks[r]``-th smallest value (1-based) over all blocks ``blocks()`` yields, [rows].

    Each block is [rows, width] of non-negative floats (magnitudes); the rows are separate vectors
    cut the same way. Non-negative floats order as their bit patterns do, so the value is found
    16 bits at a time (radix selection): each pass walks ``blocks()`` once and counts, per row,
    the next 16 bits of the entries that share the bits found so far. 2 passes for float32, 4 for
    float64: the result is exactly ``torch.kthvalue`` of the concatenated rows (NaN sorts last).
    """
    rows = len(ks)
    remaining = torch.tensor(ks, dtype=torch.int64)
    prefix = torch.zeros(rows, dtype=torch.int64)
    dtype: torch.dtype | None = None
    bits, shift = 0, 0
    while dtype is None or shift > 0:
        hist = torch.zeros(rows << _DIGIT, dtype=torch.int64)
        for block in blocks():
            if dtype is None:
                dtype, bits = block.dtype, 8 * block.element_size()
                shift = bits
            shift_now = max(shift - _DIGIT, 0)
            hist += _digit_counts(block, dtype, shift_now, shift, bits, prefix)
        if dtype is None:
            raise ValueError("kth_smallest was given no entries")
        shift = max(shift - _DIGIT, 0)
        counts = hist.view(rows, 1 << _DIGIT).cumsum(dim=1)
        digit = torch.searchsorted(counts, remaining[:, None]).squeeze(1)
        below = torch.where(digit > 0, counts.gather(1, (digit - 1).clamp(min=0)[:, None]).squeeze(1), 0)
        remaining -= below
        prefix = (prefix << _DIGIT) | digit
    assert dtype is not None
    return prefix.to(_INT_OF[torch.empty(0, dtype=dtype).element_size()]).view(dtype)


def _digit_counts(block: torch.Tensor, dtype: torch.dtype, low: int, high: int, bits: int,
                  prefix: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries whose bits above ``high`` equal ``prefix`` have each value of bits
    ``low:high`` (flattened [rows << 16])."""
    rows = block.shape[0]
    ints = block.contiguous().view(_INT_OF[block.element_size()]).to(torch.int64)
    digit = (ints >> low) & ((1 << (high - low)) - 1)
    digit += torch.arange(rows, device=block.device)[:, None] << _DIGIT
    if high < bits:
        digit = digit[(ints >> high) == prefix.to(block.device)[:, None]]
    return torch.bincount(digit.reshape(-1), minlength=rows << _DIGIT).cpu()
