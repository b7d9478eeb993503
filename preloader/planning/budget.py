"""The memory budget: how much page cache this process can add before it is reclaimed.

Page cache is charged to the memory cgroup of the process that first reads a page, so a
warm-up larger than the container's limit evicts its own first pages before the server
loads them. This module finds the limit that applies to this process (cgroup v2
``memory.max``/``memory.high``/``memory.current``, or v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``, of its own cgroup and every
ancestor up to the mount) and the node's ``MemAvailable``, and fits a plan into it.

The parsers are pure and live in the kernel layer (:mod:`preloader.kernel.cgroups`,
:mod:`preloader.kernel.mounts`); here :func:`check_plan` is pure arithmetic and
:func:`read_memory_budget` the one function that reads ``/proc`` and ``/sys``, so each is
tested alone. ``psutil`` is optional here: the
zipapp build carries no compiled modules, and ``/proc/meminfo`` says the same.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..kernel.cgroups import (
    memory_cgroup_dirs,
    parse_limit,
    parse_meminfo,
    parse_proc_cgroup,
)
from ..kernel.mounts import parse_mountinfo
from ..kernel.procfs import read_text
from ..settings import DEFAULT_HEADROOM, ON_OVERFLOW_POLICIES, Headroom, OnOverflow
from ..units import format_bytes
from .filetable import FileTable
from .planner import Plan
from .specs import FileSpec

__all__ = [
    "BudgetCheck",
    "CgroupLevel",
    "ColdRange",
    "MemoryBudget",
    "check_plan",
    "read_memory_budget",
]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class CgroupLevel:
    """One memory cgroup between this process and the top of its hierarchy.

    :ivar path: the cgroup's directory.
    :ivar limit_bytes: ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1); ``None``
        for no limit.
    :ivar high_bytes: ``memory.high`` (v2 only: above it the kernel throttles and
        reclaims); ``None`` for none.
    :ivar usage_bytes: ``memory.current`` / ``memory.usage_in_bytes`` (page cache included).
    """

    path: str
    limit_bytes: int | None
    usage_bytes: int | None
    high_bytes: int | None = None

    @property
    def effective_limit(self) -> int | None:
        limits = [v for v in (self.limit_bytes, self.high_bytes) if v is not None]
        return min(limits) if limits else None

    @property
    def free_bytes(self) -> int | None:
        """Bytes this level can still be charged before it reclaims."""
        limit = self.effective_limit
        if limit is None:
            return None
        return max(0, limit - (self.usage_bytes or 0))

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "limit_bytes": self.limit_bytes,
            "high_bytes": self.high_bytes,
            "usage_bytes": self.usage_bytes,
        }


@dataclass(frozen=True)
class MemoryBudget:
    """The memory this process may fill with page cache, as found right now.

    :ivar cgroup_version: 1 or 2, or ``None`` when no memory cgroup could be read.
    :ivar cgroup_levels: the process's cgroup first, then its ancestors (limited ones).
    :ivar mem_available_bytes: the node's ``MemAvailable``.
    :ivar mem_total_bytes: the node's ``MemTotal``.
    :ivar source: where the node figures came from (``psutil`` or ``/proc/meminfo``).
    :ivar notes: why a part of the budget is unknown.
    """

    cgroup_version: int | None = None
    cgroup_levels: tuple[CgroupLevel, ...] = ()
    mem_available_bytes: int | None = None
    mem_total_bytes: int | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def binding_level(self) -> CgroupLevel | None:
        """The cgroup level with the least room, or ``None`` when none is limited."""
        limited = [level for level in self.cgroup_levels if level.free_bytes is not None]
        return min(limited, key=lambda level: level.free_bytes or 0) if limited else None

    @property
    def limit_bytes(self) -> int | None:
        """The binding cgroup limit (``memory.high`` counts where lower than the max)."""
        level = self.binding_level
        return level.effective_limit if level is not None else None

    @property
    def usage_bytes(self) -> int | None:
        level = self.binding_level
        if level is not None:
            return level.usage_bytes
        return self.cgroup_levels[0].usage_bytes if self.cgroup_levels else None

    @property
    def cgroup_free_bytes(self) -> int | None:
        level = self.binding_level
        return level.free_bytes if level is not None else None

    @property
    def available_bytes(self) -> int | None:
        """Page cache this process can add: the cgroup's room, capped by MemAvailable."""
        values = [v for v in (self.cgroup_free_bytes, self.mem_available_bytes) if v is not None]
        return min(values) if values else None

    @property
    def limited_by(self) -> str:
        """What bounds :attr:`available_bytes`, in words."""
        free = self.cgroup_free_bytes
        if free is not None and (
            self.mem_available_bytes is None or free <= self.mem_available_bytes
        ):
            level = self.binding_level
            assert level is not None
            if self.cgroup_version == 2:
                name = (
                    "memory.high"
                    if level.high_bytes is not None
                    and (level.limit_bytes is None or level.high_bytes < level.limit_bytes)
                    else "memory.max"
                )
            else:
                name = "memory.limit_in_bytes"
            return f"cgroup v{self.cgroup_version} {name} of {level.path}"
        if self.mem_available_bytes is not None:
            return "node MemAvailable"
        return "unknown"

    @property
    def total_bytes(self) -> int | None:
        """The limit a headroom share is taken of: the cgroup's, else the node's."""
        limit = self.limit_bytes
        return limit if limit is not None else self.mem_total_bytes

    def allowance(self, headroom: Headroom = DEFAULT_HEADROOM) -> int | None:
        """Bytes of page cache to add at most: available minus headroom (``None``: unknown)."""
        available = self.available_bytes
        if available is None:
            return None
        return max(0, available - headroom.bytes_for(self.total_bytes))

    def describe(self) -> str:
        """One line for a log or a terminal."""
        parts = []
        if self.limit_bytes is not None:
            parts.append(
                f"cgroup v{self.cgroup_version} limit {format_bytes(self.limit_bytes)}, "
                f"usage {format_bytes(self.usage_bytes or 0)}"
            )
        elif self.cgroup_version is not None:
            parts.append(f"cgroup v{self.cgroup_version} without a memory limit")
        if self.mem_available_bytes is not None:
            parts.append(f"MemAvailable {format_bytes(self.mem_available_bytes)}")
        available = self.available_bytes
        room = format_bytes(available) if available is not None else "unknown"
        return f"{'; '.join(parts) or 'no memory figures'}: {room} free for page cache"

    def to_json(self) -> dict[str, object]:
        return {
            "available_bytes": self.available_bytes,
            "limited_by": self.limited_by,
            "cgroup_version": self.cgroup_version,
            "limit_bytes": self.limit_bytes,
            "usage_bytes": self.usage_bytes,
            "mem_available_bytes": self.mem_available_bytes,
            "mem_total_bytes": self.mem_total_bytes,
            "source": self.source,
            "cgroup_levels": [level.to_json() for level in self.cgroup_levels],
            "notes": list(self.notes),
        }


def _read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return parse_limit(text)
    except ValueError:
        return None


def _levels(version: int, directory: str, mount_point: str) -> list[CgroupLevel]:
    names = (
        ("memory.max", "memory.current", "memory.high")
        if version == 2
        else ("memory.limit_in_bytes", "memory.usage_in_bytes", None)
    )
    levels = []
    current = os.path.normpath(directory)
    top = os.path.normpath(mount_point)
    while True:
        limit_file = os.path.join(current, names[0])
        if os.path.exists(limit_file):
            usage_text = read_text(os.path.join(current, names[1]))
            levels.append(
                CgroupLevel(
                    path=current,
                    limit_bytes=_read_int(limit_file),
                    usage_bytes=int(usage_text)
                    if usage_text and usage_text.strip().isdigit()
                    else None,
                    high_bytes=_read_int(os.path.join(current, names[2])) if names[2] else None,
                )
            )
        if current == top or not current.startswith(top + "/"):
            break
        current = os.path.dirname(current)
    return levels


def _node_memory() -> tuple[int | None, int | None, str]:
    # /proc/meminfo first: it is what psutil reads on Linux too, and importing psutil
    # costs the short commands more CPU than the read.
    text = read_text("/proc/meminfo")
    if text is not None:
        info = parse_meminfo(text)
        if "MemAvailable" in info:
            return info.get("MemAvailable"), info.get("MemTotal"), "/proc/meminfo"
    try:
        import psutil  # compiled, and so absent from the zipapp: optional
    except ImportError:
        return None, None, "unavailable"
    try:
        memory = psutil.virtual_memory()
    except (OSError, RuntimeError):
        return None, None, "unavailable"
    return int(memory.available), int(memory.total), "psutil"


def read_memory_budget(proc_self: str = "/proc/self") -> MemoryBudget:
    """Find this process's memory budget now: its memory cgroup(s) and the node's memory.

    Reads ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` to find the cgroup directory
    (v1 ``memory`` hierarchy or v2 unified, whichever carries the memory controller), then
    the limit and usage files of that cgroup and each ancestor up to the mount, and
    ``MemAvailable``. Never raises: what cannot be read is left ``None`` and noted.

    :param proc_self: the ``/proc/<pid>`` of the process to look at.
    """
    notes: list[str] = []
    version: int | None = None
    levels: list[CgroupLevel] = []
    cgroup_text = read_text(os.path.join(proc_self, "cgroup"))
    mountinfo_text = read_text(os.path.join(proc_self, "mountinfo"))
    if cgroup_text is None or mountinfo_text is None:
        notes.append("cannot read /proc/self/cgroup or mountinfo: cgroup limit unknown")
    else:
        v1, v2 = parse_proc_cgroup(cgroup_text)
        candidates = memory_cgroup_dirs(v1, v2, parse_mountinfo(mountinfo_text))
        for candidate_version, directory, mount_point in candidates:
            found = _levels(candidate_version, directory, mount_point)
            if found:
                version, levels = candidate_version, found
                break
        if version is None:
            notes.append(
                "no memory cgroup found (no v1 memory hierarchy, no memory.max in the v2 "
                "cgroup): only the node's MemAvailable bounds the warm-up"
            )
    available, total, source = _node_memory()
    if available is None:
        notes.append("cannot read MemAvailable")
    return MemoryBudget(
        cgroup_version=version,
        cgroup_levels=tuple(levels),
        mem_available_bytes=available,
        mem_total_bytes=total,
        source=source,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class ColdRange:
    """Bytes of one file the plan leaves cold to stay within the budget."""

    path: str
    offset: int
    length: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "offset": self.offset, "bytes": self.length}


@dataclass(frozen=True)
class BudgetCheck:
    """A plan compared with the memory budget, and what to warm because of it.

    :ivar plan: the plan to warm: the original, or its trimmed prefix under ``trim``.
    :ivar policy: ``warn``, ``trim`` or ``fail``.
    :ivar planned_bytes: bytes of the original plan.
    :ivar need_bytes: bytes the original plan would add to the page cache (planned bytes
        not already resident; unknown residency counts as not resident).
    :ivar headroom_bytes: bytes kept free below the budget.
    :ivar allowance_bytes: bytes it may add, ``None`` when the budget is unknown.
    :ivar cold: what stays cold (under ``trim``), in plan order.
    """

    budget: MemoryBudget
    plan: Plan
    policy: OnOverflow
    planned_bytes: int
    need_bytes: int
    headroom_bytes: int
    allowance_bytes: int | None
    cold: tuple[ColdRange, ...] = ()

    @property
    def over_budget(self) -> bool:
        return self.allowance_bytes is not None and self.need_bytes > self.allowance_bytes

    @property
    def cold_bytes(self) -> int:
        return sum(c.length for c in self.cold)

    def message(self) -> str:
        """One line naming the numbers."""
        allowance = self.allowance_bytes
        allowed = format_bytes(allowance) if allowance is not None else "unknown"
        return (
            f"the plan needs {format_bytes(self.need_bytes)} of page cache "
            f"({format_bytes(self.planned_bytes)} planned) but the memory budget allows "
            f"{allowed} ({self.budget.describe()}; limited by {self.budget.limited_by}; "
            f"headroom {format_bytes(self.headroom_bytes)})"
        )

    def to_json(self) -> dict[str, object]:
        document = self.budget.to_json()
        document.update(
            {
                "on_overflow": self.policy,
                "planned_bytes": self.planned_bytes,
                "need_bytes": self.need_bytes,
                "headroom_bytes": self.headroom_bytes,
                "allowance_bytes": self.allowance_bytes,
                "over_budget": self.over_budget,
            }
        )
        return document


def check_plan(
    plan: Plan,
    budget: MemoryBudget,
    policy: OnOverflow = "trim",
    headroom: Headroom = DEFAULT_HEADROOM,
    resident: Sequence[int | None] | None = None,
) -> BudgetCheck:
    """Compare ``plan`` with ``budget``; under ``trim``, cut it to fit.

    Trimming keeps the plan's order (metadata, then weights as loaders read them) and
    takes files while they fit; the first file that does not fit is planned as the prefix
    that does (whole pages), and everything after it stays cold. Bytes already resident
    cost nothing, so re-running a warm-up on a warm model does not trim it.

    :param resident: bytes already resident per planned file (``None`` where unknown),
        aligned with ``plan.files``; omit to count every byte as needed.
    :raises ValueError: for an unknown policy.
    """
    if policy not in ON_OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {policy!r} (warn, trim or fail)")
    # One array of byte counts, not an int object per file.
    sizes = plan.files.sizes()
    if resident is None:
        costs = array("q", sizes)
    else:
        costs = array(
            "q", (size - min(size, r or 0) for size, r in zip(sizes, resident, strict=True))
        )
    need = sum(costs)
    headroom_bytes = headroom.bytes_for(budget.total_bytes)
    allowance = budget.allowance(headroom)
    check = BudgetCheck(
        budget=budget,
        plan=plan,
        policy=policy,
        planned_bytes=plan.total_bytes,
        need_bytes=need,
        headroom_bytes=headroom_bytes,
        allowance_bytes=allowance,
    )
    if not check.over_budget or policy != "trim":
        return check
    assert allowance is not None
    kept: list[FileSpec] = []
    cold: list[ColdRange] = []
    used = 0
    for spec, cost in zip(plan.files, costs, strict=True):
        if cold:
            cold.append(ColdRange(spec.path, 0, spec.size))
        elif used + cost <= allowance:
            kept.append(spec)
            used += cost
        else:
            # The first file that does not fit is warmed as far as it fits: the front of a
            # single huge GGUF file is still the part a loader reads first.
            prefix = (allowance - used) - (allowance - used) % _PAGE
            if prefix > 0 and not spec.metadata:
                kept.append(replace(spec, size=prefix))
                cold.append(ColdRange(spec.path, prefix, spec.size - prefix))
            else:
                cold.append(ColdRange(spec.path, 0, spec.size))
    return replace(check, plan=replace(plan, files=FileTable.of(kept)), cold=tuple(cold))
