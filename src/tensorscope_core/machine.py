"""The memory a run may plan for when the user names no budget: what the chosen device has free now.

CPU: the kernel's ``MemAvailable`` (what can be allocated without swapping), capped by a cgroup v2
limit when the process runs in one (containers, batch jobs), less a margin of 10% (at least
512 MiB) for the interpreter, the allocator and what the plan does not model. CUDA: the free
memory ``torch.cuda.mem_get_info`` reports for the device, less 5% (at least 256 MiB) for the
caching allocator's fragmentation. The budget is read once, before any model loads, so the
weights the run loads count against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import format_bytes, parse_bytes
from .errors import UsageError

MiB = 2**20


@dataclass(frozen=True)
class Budget:
    """The bytes a plan must fit in, and where they came from (said in the plan)."""

    nbytes: int
    source: str


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit, None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_cpu_memory() -> int:
    """Bytes the process can still allocate on the host (no swapping, within its cgroup)."""
    free = _meminfo_available()
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    room = _cgroup_room()
    candidates = [b for b in (free, room) if b is not None]
    if not candidates:
        raise RuntimeError("cannot read the free memory of this machine: name a budget (--memory-budget 8GiB)")
    return min(candidates)


def machine_budget(device: str) -> Budget:
    """The budget of ``device`` now: its free memory less a margin."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        margin = max(256 * MiB, free // 20)
        return Budget(max(free - margin, 0), f"free memory of {device} ({format_bytes(free)}) "
                                             f"less {format_bytes(margin)}")
    free = available_cpu_memory()
    margin = max(512 * MiB, free // 10)
    return Budget(max(free - margin, 0), f"available RAM ({format_bytes(free)}) less {format_bytes(margin)}")


def run_budget(memory_budget: str | int | None, device: str) -> Budget:
    """The budget a run plans for: the one named, else the machine's."""
    if memory_budget is None:
        return machine_budget(device)
    return Budget(parse_bytes(memory_budget), "memory_budget")


def check_device(device: str) -> None:
    """Refuse a device this process cannot use before anything loads (a CUDA device on a CPU build of
    torch, a GPU index past the last one), with the fix."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"device {device!r} was asked for, but {why}",
                             "run with --device cpu (RunConfig(device='cpu')), or install a CUDA build of torch "
                             "on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)", "pick cuda:0 .. cuda:N-1")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} was asked for, but MPS is not available here", "run with --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r} is not one TensorScope runs on", "use cpu, cuda, cuda:N or mps")
