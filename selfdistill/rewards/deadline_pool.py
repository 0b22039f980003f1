"""A small process pool where every item has a deadline and a hung worker is killed.

`concurrent.futures` cannot cancel a running task, and math-verify's own timeouts use
`signal.alarm` (main thread only, and they turn a timeout into a silent "no match"). So each
worker here is a `spawn`ed process fed one item at a time over a pipe; when an item runs past
its deadline the parent SIGKILLs that worker, reports the item as timed out and starts a
replacement. A worker that dies while it holds an item (killed for memory, say) is replaced
and the item runs once more on the fresh worker; a second death reports it as an error. Other workers keep going, so a run never stalls on one answer. Being built from
processes and pipes only, it works from any thread and inside Ray actors.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_READY = "ready"
_STOP = None


def _resolve(qualified_name: str) -> Callable[..., Any]:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _serve(conn: Connection, fn_name: str, warm_up_name: str | None) -> None:
    """Worker loop: warm up, say ready, then answer one item at a time until told to stop."""
    fn = _resolve(fn_name)
    if warm_up_name is not None:
        _resolve(warm_up_name)()
    conn.send(_READY)
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent is gone
            return
        if item is _STOP:
            return
        try:
            conn.send(("ok", fn(item)))
        except Exception as e:  # the item failed, not the worker
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


@dataclass
class _Slot:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    deadline: float  # start-up deadline while not ready, item deadline while busy
    ready: bool = False
    task: int | None = None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class DeadlinePool:
    """Runs `fn` on items in `num_workers` processes with `timeout_s` per item.

    `fn` and `warm_up` are dotted names of module-level functions ("pkg.module.function"),
    imported in the workers only, so the caller need not load what they use. `map`
    returns, per item and in order, `("ok", value)`, `("timeout", None)` or
    `("error", message)`. Workers start on first use; one that is not ready within
    `start_timeout_s` is a hard error (RuntimeError), since nothing could be scored.
    """

    def __init__(
        self,
        fn: str,
        num_workers: int,
        timeout_s: float,
        warm_up: str | None = None,
        start_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._fn = fn
        self._warm_up = warm_up
        self._num_workers = num_workers
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()  # one map at a time: slots are not shared between calls
        self._closed = False
        self.started = 0  # worker processes started so far, replacements included
        self.deaths = 0  # workers that died while holding an item (not counting deadline kills)
        self._finalizer = weakref.finalize(self, _shutdown, self._slots)

    def map(self, items: list[Any]) -> list[tuple[str, Any]]:
        """Run `fn` on every item; see the class docstring for the result shape."""
        if not items:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("DeadlinePool.map called after close()")
            while len(self._slots) < self._num_workers:
                self._slots.append(self._start_worker())
            try:
                return self._run(items)
            except BaseException:
                # Workers may still hold items of this call: never let them answer the next one.
                _shutdown(self._slots)
                raise

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def _start_worker(self) -> _Slot:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child_conn, self._fn, self._warm_up), daemon=True)
        process.start()
        self.started += 1
        child_conn.close()
        return _Slot(process, parent_conn, deadline=time.monotonic() + self._start_timeout_s)

    def _replace(self, index: int) -> None:
        self._slots[index].kill()
        self._slots[index] = self._start_worker()

    def _run(self, items: list[Any]) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(items)
        queue = deque(range(len(items)))
        self._retried: set[int] = set()
        self._queue = queue
        while queue or any(slot.task is not None for slot in self._slots):
            for i, slot in enumerate(self._slots):
                if slot.ready and slot.task is None and queue:
                    task = queue.popleft()
                    try:
                        slot.conn.send(items[task])
                    except OSError:  # died while idle: retry the item on a fresh worker
                        queue.appendleft(task)
                        self._replace(i)
                        continue
                    slot.task = task
                    slot.deadline = time.monotonic() + self._timeout_s
            waiting = [i for i, s in enumerate(self._slots) if not s.ready or s.task is not None]
            next_deadline = min(self._slots[i].deadline for i in waiting)
            conns = [self._slots[i].conn for i in waiting]
            ready_conns = wait(conns, timeout=max(0.0, next_deadline - time.monotonic()))
            for i in waiting:
                if self._slots[i].conn in ready_conns:
                    self._receive(i, results)
                elif time.monotonic() >= self._slots[i].deadline:
                    self._expire(i, results)
        return results  # type: ignore[return-value]

    def _receive(self, index: int, results: list) -> None:
        slot = self._slots[index]
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):
            slot.process.join(timeout=5)
            code = slot.process.exitcode
            if not slot.ready:
                raise RuntimeError(f"verifier worker died while starting (exit code {code})") from None
            self.deaths += 1
            if slot.task in self._retried:
                results[slot.task] = ("error", f"worker died (exit code {code})")
            else:  # once more, on a fresh worker: the death may have nothing to do with the item
                self._retried.add(slot.task)
                self._queue.appendleft(slot.task)
            slot.task = None
            self._replace(index)
            return
        if not slot.ready:
            slot.ready = True
        else:
            results[slot.task] = message
            slot.task = None

    def _expire(self, index: int, results: list) -> None:
        slot = self._slots[index]
        if not slot.ready:
            raise RuntimeError(f"verifier worker not ready after {self._start_timeout_s:.0f} s")
        results[slot.task] = ("timeout", None)
        self._replace(index)


def _shutdown(slots: list[_Slot]) -> None:
    for slot in slots:
        with contextlib.suppress(OSError):
            slot.conn.send(_STOP)
    for slot in slots:
        slot.process.join(timeout=1)
        if slot.process.is_alive():
            slot.kill()
        else:
            slot.conn.close()
    slots.clear()
