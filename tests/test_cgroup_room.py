"""The default CPU budget is capped by the room under the tightest memory limit of the process's
cgroups, v2 and v1, at its own level or any above it (a Slurm job's or a container's limit is often
set on a parent group). Each case builds the kernel's files in a temporary folder: the process's
``/proc/self/cgroup`` and the mounted hierarchies, with limits and usages known."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorscope_core import RunConfig
from tensorscope_core import machine as machine_mod
from tensorscope_core.machine import _cgroup_room

GiB = 2**30
V1_NO_LIMIT = 9223372036854771712  # what cgroup v1 writes for "no limit" (2**63 - 1, page-rounded)


def _group(folder: Path, files: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (folder / name).write_text(f"{value}\n")


def _proc(tmp_path: Path, text: str) -> Path:
    proc = tmp_path / "cgroup"
    proc.write_text(text)
    return proc


def test_v1_room_is_the_tightest_limit_on_the_path_up(tmp_path: Path) -> None:
    mount = tmp_path / "fs"
    proc = _proc(tmp_path, "4:memory:/slurm/uid_0/job_7/step_0\n3:cpu,cpuacct:/slurm\n0::/\n")
    _group(mount / "memory", {"memory.limit_in_bytes": V1_NO_LIMIT, "memory.usage_in_bytes": 20 * GiB})
    _group(mount / "memory/slurm/uid_0/job_7", {"memory.limit_in_bytes": 16 * GiB,
                                                "memory.usage_in_bytes": 3 * GiB})
    _group(mount / "memory/slurm/uid_0/job_7/step_0", {"memory.limit_in_bytes": V1_NO_LIMIT,
                                                       "memory.usage_in_bytes": 3 * GiB})
    assert _cgroup_room(proc, mount) == 13 * GiB  # the job's limit, two levels above the process's group
    _group(mount / "memory/slurm/uid_0/job_7/step_0", {"memory.limit_in_bytes": 12 * GiB,
                                                       "memory.usage_in_bytes": 3 * GiB})
    assert _cgroup_room(proc, mount) == 9 * GiB  # now its own group's is tighter
    # the job read 2 GiB of model files it no longer touches: page cache the kernel drops first
    (mount / "memory/slurm/uid_0/job_7/step_0/memory.stat").write_text(
        f"cache {3 * GiB}\nrss {GiB}\ninactive_file {GiB}\ntotal_inactive_file {2 * GiB}\n")
    assert _cgroup_room(proc, mount) == 11 * GiB  # the hierarchical count (total_), as the kernel reclaims


def test_v2_room_in_a_namespace_and_in_the_whole_tree(tmp_path: Path) -> None:
    mount = tmp_path / "fs"
    # a container with its own cgroup namespace: its group is the mount's root
    _group(mount, {"memory.max": 8 * GiB, "memory.current": GiB})
    assert _cgroup_room(_proc(tmp_path, "0::/\n"), mount) == 7 * GiB
    (mount / "memory.stat").write_text(f"anon {GiB // 2}\nfile {GiB // 2}\ninactive_file {GiB // 4}\n")
    assert _cgroup_room(_proc(tmp_path, "0::/\n"), mount) == 7 * GiB + GiB // 4
    (mount / "memory.stat").unlink()
    # the whole tree mounted: the process's group below the root, "max" meaning no limit at its level
    _group(mount / "user.slice/job.scope", {"memory.max": "max", "memory.current": 2 * GiB})
    _group(mount / "user.slice", {"memory.max": 4 * GiB, "memory.current": 2 * GiB})
    assert _cgroup_room(_proc(tmp_path, "0::/user.slice/job.scope\n"), mount) == 2 * GiB


def test_hybrid_v2_and_no_limit_anywhere(tmp_path: Path) -> None:
    mount = tmp_path / "fs"
    _group(mount / "memory", {"memory.limit_in_bytes": V1_NO_LIMIT, "memory.usage_in_bytes": GiB})
    proc = _proc(tmp_path, "5:memory:/\n0::/\n")
    assert _cgroup_room(proc, mount) is None  # no limit: MemAvailable alone
    _group(mount / "unified", {"memory.max": 6 * GiB, "memory.current": 5 * GiB})
    assert _cgroup_room(proc, mount) == GiB  # the unified hierarchy beside v1 (systemd's hybrid mode)
    _group(mount / "unified", {"memory.max": 6 * GiB, "memory.current": 7 * GiB})
    assert _cgroup_room(proc, mount) == 0  # over its limit: no room, not a negative one
    assert _cgroup_room(tmp_path / "absent", mount) is None  # no /proc/self/cgroup (not Linux)


def test_a_cgroup_limit_caps_the_default_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "fs"
    _group(mount / "memory/job", {"memory.limit_in_bytes": 16 * GiB, "memory.usage_in_bytes": GiB})
    monkeypatch.setattr(machine_mod, "PROC_CGROUP", _proc(tmp_path, "4:memory:/job\n"))
    monkeypatch.setattr(machine_mod, "CGROUP_MOUNT", mount)
    monkeypatch.setattr(machine_mod, "_meminfo_available", lambda: 100 * GiB)
    budget = RunConfig(device="cpu").budget()
    assert budget.nbytes == 15 * GiB - (15 * GiB) // 10  # the job's room less the 10% margin
    assert budget.source == "room under the cgroup memory limit (15.0 GiB) less 1.5 GiB"
