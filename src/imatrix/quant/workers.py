"""Forked worker processes for quantization, which end as cleanly as the parent does.

`multiprocessing.Pool` loses the task of a worker that was killed (the OOM killer, `kill -9`) and then
waits for it forever, and its workers print a BrokenPipeError traceback each when the parent dies
first. Here a dead worker is an error in the parent, the workers die with the parent (Linux), and a
worker whose parent is gone leaves without a word.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from imatrix.errors import ImatrixError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
JOIN_SECONDS = 5.0


class Workers:
    """`n_workers` forked processes applying `function` to tasks; use as a context manager.

    The workers inherit the parent's memory at the fork (an open model, an output descriptor). Leaving
    the block on an error or a signal kills them at once rather than waiting for their tasks.
    """

    def __init__(self, function: Callable[[Any], Any], n_workers: int) -> None:
        context = multiprocessing.get_context("fork")
        parent_pid = os.getpid()
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        try:
            for _ in range(n_workers):
                ours, theirs = context.Pipe()
                process = context.Process(target=_serve, args=(theirs, function, parent_pid), daemon=True)
                process.start()
                theirs.close()
                self._workers.append((process, ours))
        except OSError as exc:  # out of processes or memory
            self.__exit__(type(exc))
            raise ImatrixError(f"cannot start {n_workers} worker processes: {exc.strerror or exc}") from exc

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            for _process, connection in self._workers:
                with contextlib.suppress(OSError):
                    connection.send(None)
        for process, connection in self._workers:
            if kind is not None:
                process.kill()
            process.join(JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()

    def map(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """`function(task)` for each task, in the tasks' order; each worker holds one task at a time."""
        pending = iter(tasks)
        idle = [connection for _, connection in self._workers]
        busy: dict[Connection, int] = {}
        done: dict[int, Any] = {}
        sent = returned = 0
        while True:
            while idle and (task := next(pending, _END)) is not _END:
                connection = idle.pop()
                self._send(connection, task)
                busy[connection] = sent
                sent += 1
            if returned in done:
                yield done.pop(returned)
                returned += 1
                continue
            if not busy:
                return
            for connection in self._wait_for(busy):
                done[busy.pop(connection)] = self._result(connection)
                idle.append(connection)

    def _wait_for(self, busy: dict[Connection, int]) -> list[Connection]:
        """The connections with a result; raises if a worker died (its task would never come back)."""
        sentinels = {process.sentinel: process for process, _ in self._workers}
        ready = wait([*busy, *sentinels])
        results = [item for item in ready if item in busy]
        if results:
            return results  # a worker that died after sending is found on the next wait
        raise _died(sentinels[next(item for item in ready if item in sentinels)])

    def _send(self, connection: Connection, task: Any) -> None:
        try:
            connection.send(task)
        except (BrokenPipeError, ConnectionResetError):  # it died while idle
            raise _died(self._process_of(connection)) from None

    def _process_of(self, connection: Connection) -> multiprocessing.process.BaseProcess:
        return next(process for process, ours in self._workers if ours is connection)

    def _result(self, connection: Connection) -> Any:
        try:
            succeeded, value = connection.recv()
        except EOFError:  # it died before it could answer
            raise _died(self._process_of(connection)) from None
        if not succeeded:
            raise value
        return value


def _died(process: multiprocessing.process.BaseProcess) -> ImatrixError:
    process.join()
    return ImatrixError(f"a worker process ended unexpectedly ({_how(process.exitcode)}), perhaps killed for "
                        "want of memory (fewer worker processes need less)")


_END = object()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _serve(connection: Connection, function: Callable[[Any], Any], parent_pid: int) -> None:
    """A worker's loop: tasks in, (succeeded, result or exception) out, until None or the parent is gone."""
    child_of(parent_pid)
    try:
        while (task := connection.recv()) is not None:
            try:
                reply = (True, function(task))
            except Exception as exc:  # noqa: BLE001  (re-raised in the parent)
                reply = (False, exc)
            try:
                connection.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an exception pickle cannot take
                connection.send((False, RuntimeError(f"{reply[1]!r} (unpicklable: {exc})")))
    except (EOFError, OSError):  # the parent is gone: nobody to tell
        pass


def child_of(parent_pid: int) -> None:
    """Set up a forked helper process: Ctrl-C is the parent's to handle (it reaches the whole group), SIGTERM
    stops it (not the parent's handler, inherited at the fork), and it dies with `parent_pid` (Linux) or
    leaves now if that has already gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: a worker leaves when its pipe breaks
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)
