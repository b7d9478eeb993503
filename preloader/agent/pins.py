"""``serve --lock``: hold the warmed files' pages with ``mmap`` + ``mlock`` until the stop.

On some machines a proactive reclaimer (a DAMON ``pageout`` scheme) pages out warmed page
cache that sits idle, with no memory pressure; pinned pages stay under any scheme.
:class:`PinKeeper` asks for the permission before the first pass (:meth:`PinKeeper.prepare`:
``CAP_IPC_LOCK``, or ``RLIMIT_MEMLOCK`` above the bytes the pass plans). A refusal is said
once, as an error line and in ``/status``, and the agent warms and serves unpinned: a
warm-up never blocks a rollout, and readiness never waits for a pin. A shard (a file of
several chunks) is pinned as soon as the pass has read all of it (:meth:`PinKeeper.pin_read`,
opened again once the pass has closed it: a FUSE client frees what it kept for the pass's
open, s3fs a temporary copy of the whole file): a long warm-up's first shards are not
paged out while it reads the last. Once the first pass is over, :meth:`PinKeeper.sync`
pins every other planned file that was read in full. It runs again when a path is planned
again (a new revision: the pins of files no longer planned are released before the new
ones are read) and after every keep-warm round (the new files, once warm). Never more is
pinned than the memory budget allowed when the first pass was planned: the first pass's
plan (after its trim to the budget), or a new revision up to the budget's room then. A
lock that fails midway releases every pin, says why and pins nothing more. Everything is
released when the agent stops.

Every pin is taken on one thread of its own, at the lowest CPU priority
(:func:`~preloader.kernel.pinning.lowest_cpu_priority`), in the order asked: locking
costs CPU (~0.15 s a GiB), which the warm-up, the FUSE client and the server need more.

A pin keeps its file open in a FUSE client for as long as it holds it, and with it what
the client keeps for an open that others share: s3fs keeps its temporary copy of a file
the pass or the server had open when it was pinned (see docs/serve.md, "Pinning the
model").

Runs on the agent's event loop, but for the pinning thread: what is held is guarded by a
lock. Front ends read :meth:`PinKeeper.snapshot` from their own thread (a
:class:`~preloader.kernel.pinning.PinSet` may be read from any thread).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread

from ..engine.events import EventKind
from ..kernel.fileread import FileChangedError
from ..kernel.pinning import Pin, PinSet, lowest_cpu_priority, memlock_permission
from ..planning.budget import MemoryBudget
from ..planning.specs import FileSpec
from ..settings import DEFAULT_HEADROOM
from ..units import format_bytes, printable
from .state import PassContext

__all__ = ["LockSnapshot", "PinKeeper"]

_Key = tuple[str, int, int, int | None, int]
"""A planned file as pinned: path, device, inode, modification time, size."""

_REFUSED = (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
"""``mlock``'s answers when the limit or the missing capability forbids it."""

_T = TypeVar("_T")


def _key(spec: FileSpec) -> _Key:
    return (spec.path, spec.dev, spec.ino, spec.mtime_ns, spec.size)


@dataclass(frozen=True)
class LockSnapshot:
    """``--lock`` as ``/status`` shows it (``lock``).

    :ivar pinned_bytes: bytes held pinned now.
    :ivar pinned_files: files held pinned now.
    :ivar error: why the pages are not pinned (no permission, or a lock that failed and
        was released), naming the fix; ``None`` while pinning works.
    """

    pinned_bytes: int
    pinned_files: int
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "pinned_bytes": self.pinned_bytes,
            "pinned_files": self.pinned_files,
            "error": self.error,
        }


@dataclass
class _Pinned:
    """What one pinning run in the worker thread did."""

    pins: list[tuple[_Key, Pin]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passed: list[_Key] = field(default_factory=list)
    failure: str | None = None


class PinKeeper:
    """Pin the served paths' warmed files while ``--lock`` is on; release them at the end.

    :param context: the served paths, settings, events and stop signals (see
        :class:`~.state.PassContext`); ``context.config.lock`` turns it on.
    """

    def __init__(self, context: PassContext) -> None:
        self._context = context
        self._emit = context.events.emit
        self._on = context.config.lock
        self._pins = PinSet()
        self._pinner: ThreadPoolExecutor | None = None  # the pinning thread, once prepared
        # What is pinned, by planned file: the pinning thread adds to it.
        self._lock = threading.Lock()
        self._held: dict[_Key, Pin] = {}
        self._unsaid: list[Pin] = []  # pinned by the pass, not logged yet
        self._failed_midway: str | None = None  # a lock pin_read's pin could not take
        # Touched only on the event loop: files not to try again (over the budget, or gone:
        # keep-warm plans a replaced file again, under a new key).
        self._passed: set[_Key] = set()
        self._ceiling: int | None = None  # bytes to pin at most; None: no limit known
        self._error: str | None = None

    def snapshot(self) -> LockSnapshot | None:
        """What is pinned now; ``None`` without ``--lock``. Safe from any thread."""
        if not self._on:
            return None
        pins = self._pins.pins
        return LockSnapshot(sum(p.length for p in pins), len(pins), self._error)

    async def prepare(self, budget: MemoryBudget | None) -> None:
        """Before the first pass (its plans trimmed to ``budget``): take the most to pin
        from the budget, and refuse now (one error line, ``/status``) when the process
        may not pin the planned bytes.

        :param budget: the memory budget the plans were trimmed to; ``None``: unknown.
        """
        if not self._on:
            return
        models = self._context.models
        planned = sum(m.plan.total_bytes for m in models if m.state != "failed")
        allowance = None if budget is None else budget.allowance(DEFAULT_HEADROOM)
        self._ceiling = None if allowance is None else max(planned, allowance)
        # /proc/self/status and a getrlimit: small, but on a worker thread as all I/O is.
        permission = await anyio.to_thread.run_sync(memlock_permission)
        refusal = permission.refusal(planned)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._pinner = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="preloader-pin", initializer=lowest_cpu_priority
        )

    async def _on_pinner(self, job: Callable[[], _T]) -> _T:
        """Run ``job`` on the pinning thread, after every pin asked for before it."""
        assert self._pinner is not None
        future = self._pinner.submit(job)
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    def pin_read(self, spec: FileSpec) -> None:
        """Ask for a file the pass has just read in full and closed to be pinned (the
        pass's ``on_file_read``, from the worker thread that read it; never raises, never
        waits): the pinning thread opens it again, checks it is the planned file, maps
        and locks it, and closes it.

        A file already pinned, one over the budget's room, or any file after a refusal is
        left alone; :meth:`sync` says so once the pass is over. A lock refused (the limit,
        the capability) stops all pinning: :meth:`sync` releases every pin and says why.
        """
        pinner = self._pinner  # None once released
        if pinner is None or self._error is not None or self._context.stop.is_set():
            return
        with contextlib.suppress(RuntimeError):  # shut down meanwhile: the agent stops
            pinner.submit(self._pin_one, spec)

    def _pin_one(self, spec: FileSpec) -> None:
        """:meth:`pin_read`'s part on the pinning thread."""
        if self._context.stop.is_set() or self._error is not None:
            return
        key = _key(spec)
        with self._lock:
            if self._failed_midway is not None or key in self._held:
                return
        done = self._pin_in_thread([(key, spec)])
        # A file skipped here (over the room, gone) is tried again by sync, which says why.
        with self._lock:
            self._held.update(done.pins)
            self._unsaid.extend(pin for _, pin in done.pins)
            if done.failure is not None:
                self._failed_midway = done.failure

    def _refuse(self, cause: str) -> None:
        self._error = cause
        self._emit(EventKind.LOCK_REFUSED, detail=f"{cause}; warming and serving unpinned")
        self._context.events.changed()

    async def sync(self) -> None:
        """Release the pins of files no longer planned; pin the planned files read in full.

        The pins are made on the pinning thread, after those the pass asked for, one file
        at a time, stopping at the agent's stop (abandoned when cancelled: :meth:`release`
        still finds what it pinned).
        """
        if self._pinner is None or self._error is not None:
            return
        await self._on_pinner(lambda: None)  # the pins the pass asked for are taken
        if self._failed_midway is not None:
            await self._fail(self._failed_midway)
            return
        with self._lock:
            held = set(self._held)
        planned: set[_Key] = set()
        warm: dict[_Key, FileSpec] = {}
        for model in self._context.models:
            for spec, full in zip(model.plan.files, model.read_in_full, strict=True):
                key = _key(spec)
                planned.add(key)
                if full and key not in held and key not in self._passed:
                    warm[key] = spec
        self._passed &= planned
        gone = [key for key in held if key not in planned]
        if gone:
            with self._lock:
                pins = {self._held.pop(key) for key in gone}
            released = await anyio.to_thread.run_sync(self._pins.release, pins)
            self._emit(
                EventKind.UNPINNED,
                detail=f"{len(pins)} files no longer planned, {format_bytes(released)}",
                fields=(("bytes", released),),
            )
            self._context.events.changed()
        done = _Pinned()
        if warm and not self._context.stop.is_set():
            todo = list(warm.items())
            done = await self._on_pinner(lambda: self._pin_in_thread(todo))
        with self._lock:
            self._held.update(done.pins)
            new = [*self._unsaid, *(pin for _, pin in done.pins)]
            self._unsaid.clear()
        self._passed.update(done.passed)
        if done.failure is not None:
            await self._fail(done.failure)
            return
        if not new and not done.skipped:  # nothing new, or stopped before the first file
            return
        snap = self.snapshot()
        assert snap is not None
        detail = (
            f"{len(new)} files, {format_bytes(sum(p.length for p in new))} "
            f"pinned (mmap + mlock), held until SIGTERM or SIGINT"
        )
        if done.skipped:
            detail += f"; {len(done.skipped)} not pinned (first {done.skipped[0]})"
        fields = (("pinned_bytes", snap.pinned_bytes), ("pinned_files", snap.pinned_files))
        self._emit(EventKind.PINNED, detail=detail, fields=fields)
        self._context.events.changed()

    async def _fail(self, cause: str) -> None:
        """A lock refused midway: release every pin and serve unpinned, saying why."""
        released = await anyio.to_thread.run_sync(self._pins.release)
        with self._lock:
            self._held.clear()
            self._unsaid.clear()
        self._refuse(f"{cause} (released all {format_bytes(released)} pinned)")

    def _pin_in_thread(self, todo: list[tuple[_Key, FileSpec]]) -> _Pinned:
        """Pin ``todo`` in order while the budget's room lasts; the pinning thread's part."""
        done = _Pinned()
        room = None if self._ceiling is None else self._ceiling - self._pins.pinned_bytes
        for key, spec in todo:
            if self._context.stop.is_set():
                break
            if room is not None and spec.size > room:
                done.skipped.append(
                    f"{printable(spec.path)}: over the {format_bytes(self._ceiling or 0)} "
                    "the memory budget allowed at the start"
                )
                done.passed.append(key)
                continue
            try:
                pin = self._pins.pin(spec.path, spec.size, spec.dev, spec.ino, spec.mtime_ns)
            except OSError as err:
                cause = f"{printable(spec.path)}: cannot pin: {err.strerror or err}"
                if err.errno in _REFUSED and not isinstance(err, FileChangedError):
                    done.failure = cause
                    break
                done.skipped.append(cause)  # gone or replaced: keep-warm plans it again
                done.passed.append(key)
                continue
            room = None if room is None else room - pin.length
            done.pins.append((key, pin))
        return done

    async def release(self) -> None:
        """Unpin everything (the agent stops); shielded, so a cancelled stop still does it."""
        pinner, self._pinner = self._pinner, None
        with anyio.CancelScope(shield=True):
            if pinner is not None:  # the pin being taken ends; those asked for are dropped
                await anyio.to_thread.run_sync(lambda: pinner.shutdown(cancel_futures=True))
            if not self._pins.pins:
                return
            released = await anyio.to_thread.run_sync(self._pins.release)
        with self._lock:
            self._held.clear()
            self._unsaid.clear()
        self._emit(
            EventKind.UNPINNED,
            detail=f"{format_bytes(released)} unpinned at the stop",
            fields=(("bytes", released),),
        )
        self._context.events.changed()
