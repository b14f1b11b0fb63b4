"""Short model names: a run's models named by the fewest trailing path parts that tell them apart.

Results, tables and reports are keyed by model name. The path as typed (``/home/me/runs/ckpt-500``)
makes a poor label and leaks the machine's folders into shared results, so a model given by path is
named ``ckpt-500``, or ``run-a/final`` beside ``run-b/final``. The path stays in the record
(``ModelRecord.source``) and ``Results.get(model=...)`` takes either.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Sequence
from pathlib import PurePath

from torch import nn

from .load import ModelSource


def _parts(source: ModelSource) -> tuple[str, ...]:
    """The absolute path's parts, so ``.`` and ``../ckpt`` name the folders they point at."""
    return PurePath(os.path.abspath(os.fspath(source.source))).parts  # type: ignore[arg-type]


def _suffix(parts: tuple[str, ...], k: int) -> str:
    return "/".join(p for p in parts[-k:] if p not in ("/", "\\")) or parts[0]


def short_names(sources: Sequence[ModelSource], taken: Collection[str] = ()) -> list[ModelSource]:
    """``sources`` with every unnamed path source named by its shortest distinct path suffix.

    A suffix is distinct when no other path source of the run ends the same way at that length and it
    is none of ``taken`` or the run's explicit names (``base``, ``a=PATH``, a module's class name).
    Two sources of one path get one name, so the run's duplicate check refuses them."""
    def unnamed_path(s: ModelSource) -> bool:
        return s.name is None and not isinstance(s.source, nn.Module)

    fixed = {s.display_name for s in sources if not unnamed_path(s)} | set(taken)
    parts = [_parts(s) if unnamed_path(s) else () for s in sources]
    named: list[ModelSource] = []
    for i, src in enumerate(sources):
        if not unnamed_path(src):
            named.append(src)
            continue
        mine = parts[i]
        others = [p for j, p in enumerate(parts) if j != i and p and p != mine]
        for k in range(1, len(mine) + 1):
            name = _suffix(mine, k)
            if name not in fixed and all(_suffix(p, k) != name for p in others):
                break
        named.append(dataclasses.replace(src, name=name))
    return named
