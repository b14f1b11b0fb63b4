"""The memory a run may plan for when the user names no budget: what the chosen device has free now.

CPU: the kernel's ``MemAvailable`` (what can be allocated without swapping), capped by the room
under the tightest memory limit of the cgroups the process runs in (containers, Slurm and other
batch jobs; cgroup v2 and v1, the process's own group and the groups above it), less a margin of 10%
(at least 512 MiB) for the interpreter, the allocator and what the plan does not model. CUDA: the free
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


#: where the kernel's cgroup file systems are mounted, and where it lists the process's groups
CGROUP_MOUNT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
#: cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
_V1_UNLIMITED = 2**62


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max" (no limit) is not a number


def _group_dirs(root: Path, group: str) -> list[Path]:
    """The folders of ``group`` and of every group above it under ``root``, innermost first. In a
    container with its own cgroup namespace the group is "/" and ``root`` is the container's group;
    without one, ``root`` holds the whole tree and the group's path is found below it."""
    if not root.is_dir():
        return []
    parts = [p for p in group.strip("/").split("/") if p]
    dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [root]


def _cgroup_limits(proc_cgroup: Path, mount: Path) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of each memory cgroup level the process is under (v2 and v1)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    levels: list[tuple[Path, str, str]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # the unified (v2) hierarchy, alone or beside v1
            for root in (mount, mount / "unified"):
                levels += [(d, "memory.max", "memory.current") for d in _group_dirs(root, group)]
        elif "memory" in controllers.split(","):
            levels += [(d, "memory.limit_in_bytes", "memory.usage_in_bytes")
                       for d in _group_dirs(mount / "memory", group)]
    return levels


def _inactive_file(folder: Path) -> int:
    """Bytes of the group's page cache not recently used (``memory.stat``: v2 ``inactive_file``, v1
    ``total_inactive_file``): counted in its usage, but the kernel drops it before it reclaims anything
    else, so it is room (docker's and the kubelet's working set leave it out the same way)."""
    try:
        lines = (folder / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    stat = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
    value = stat.get("total_inactive_file", stat.get("inactive_file", "0"))
    return int(value) if value.isdigit() else 0


def _cgroup_room(proc_cgroup: Path | None = None, mount: Path | None = None) -> int | None:
    """Room left under the tightest memory limit among the process's cgroups and the groups above
    them, None without a limit. A job's limit is often set on a group above the process's own (a
    Slurm job's, a container's), so every level counts. A group's usage counts its page cache (the
    model files it read): the inactive part of it is room."""
    rooms = []
    for folder, limit_file, usage_file in _cgroup_limits(proc_cgroup or PROC_CGROUP, mount or CGROUP_MOUNT):
        limit, used = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is not None and used is not None and limit < _V1_UNLIMITED:
            rooms.append(max(limit - max(used - _inactive_file(folder), 0), 0))
    return min(rooms, default=None)


def available_cpu_memory() -> tuple[int, str]:
    """Bytes the process can still allocate on the host (no swapping, within its cgroups), and which
    bound that is."""
    free = _meminfo_available()
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    room = _cgroup_room()
    if room is not None and (free is None or room < free):
        return room, "room under the cgroup memory limit"
    if free is None:
        raise RuntimeError("cannot read the free memory of this machine: name a budget (--memory-budget 8GiB)")
    return free, "available RAM"


def machine_budget(device: str) -> Budget:
    """The budget of ``device`` now: its free memory less a margin."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        margin = max(256 * MiB, free // 20)
        return Budget(max(free - margin, 0), f"free memory of {device} ({format_bytes(free)}) "
                                             f"less {format_bytes(margin)}")
    free, bound = available_cpu_memory()
    margin = max(512 * MiB, free // 10)
    return Budget(max(free - margin, 0), f"{bound} ({format_bytes(free)}) less {format_bytes(margin)}")


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
