"""Atomic file replacement: a crash mid-write never destroys the previous file.

An output is written to a temporary file beside it (`.<name>.<random>.tmp`), which then replaces it in
one rename. While a process writes an output it holds an advisory lock on `.<name>.lock` beside it
(`claimed_output`): a second process writing the same output is refused, and the first to claim an
output removes the temporary files a killed writer left (no live writer can own them then).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from imatrix.errors import ImatrixError, ImatrixWarning

try:
    import fcntl
except ImportError:  # not a POSIX system: no locks, and no stale temporaries removed
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | Path) -> None:
    """Fail now, before any work, if `path` cannot be written: better than after an hour of collection."""
    if not str(path):
        raise ImatrixError("the output file name is empty")
    target = _writable_target(path)
    if target is None:
        return
    _temporary_beside(target, path).unlink(missing_ok=True)  # a claimant may have swept it already
    with claimed_output(path):  # another process writing it: refused now, not at the first save
        pass


def check_not_an_input(output: str | Path, **inputs: str | Path | None) -> None:
    """Fail if writing `output` would replace one of the command's `inputs` (keyword: what it is)."""
    if not Path(output).exists():
        return
    for what, path in inputs.items():
        if path is not None and Path(path).exists() and os.path.samefile(output, path):
            raise ImatrixError(f"{output}: is also the {what.replace('_', ' ')}: writing it would destroy it")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A symlink keeps pointing at its file, which is replaced; an existing file keeps its permissions.
    A device or a pipe (`/dev/null`) is written through directly: renaming over it would replace it.
    """
    target = _writable_target(path)
    if target is None:
        with _write_errors(path):
            yield Path(path)
        return
    with claimed_output(path), _write_errors(path), _temporary_in_place(target, path) as tmp:
        yield tmp


@contextlib.contextmanager
def _temporary_in_place(target: Path, path: str | Path) -> Iterator[Path]:
    """A temporary file beside `target` that replaces it when the block ends without an error."""
    tmp = _temporary_beside(target, path)
    try:
        # mkstemp makes 0600: give the file the old one's mode, or what the umask allows a new file
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _writable_target(path: str | Path) -> Path | None:
    """The regular file that writing `path` replaces (a symlink's target); None for a device or a pipe.

    Raises for a directory or a missing parent directory.
    """
    target = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    if target.is_dir():
        raise ImatrixError(f"{path}: is a directory, not an output file")
    if target.exists() and not target.is_file():
        return None
    parent = _parent(target)
    if not parent.is_dir():
        raise ImatrixError(f"{path}: output directory '{parent}' does not exist")
    return target


def _temporary_beside(target: Path, path: str | Path) -> Path:
    """A new empty file in `target`'s directory (mode 0600), named after it; errors name `path`."""
    with _write_errors(path):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=_parent(target))
    os.close(fd)
    return Path(name)


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


@contextlib.contextmanager
def _write_errors(path: str | Path) -> Iterator[None]:
    """An OSError while writing `path` (disk full, read-only file system…) as one line naming it."""
    try:
        yield
    except BrokenPipeError:
        raise  # a reader that left our stdout, or the output pipe: the command ends quietly (cli.main)
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot write: {exc.strerror or exc}") from exc


# --- one writer per output ---

_claims: dict[Path, tuple[int, int]] = {}  # lock file -> (its descriptor, nesting depth) in this process
_claims_lock = threading.Lock()
NOT_LOCKED = -1  # the descriptor of a claim on a file system that has no locks


@contextlib.contextmanager
def claimed_output(path: str | Path | None) -> Iterator[None]:
    """Hold `path` as this process's output for the block: another process holding it is an error.

    Re-entrant within a process. The first claim removes the temporary files of `path` that a killed
    writer left behind. A device, a pipe or None claims nothing; so does a system without `fcntl`.
    """
    target = _writable_target(path) if path is not None and fcntl is not None else None
    if target is None:
        yield
        return
    lock_path = _parent(target) / f".{target.name}.lock"
    with _claims_lock:
        fd, depth = _claims.get(lock_path) or (_lock(lock_path, path), 0)
        _claims[lock_path] = (fd, depth + 1)
        if not depth and fd != NOT_LOCKED:
            _remove_stale_temporaries(target)
    try:
        yield
    finally:
        with _claims_lock:
            fd, depth = _claims.pop(lock_path)
            if depth > 1:
                _claims[lock_path] = (fd, depth - 1)
            else:
                _unlock(lock_path, fd)


def _lock(lock_path: Path, path: str | Path) -> int:
    """An exclusive lock on `lock_path` (created if needed), whose file then holds our pid; raises if another
    process holds it. `NOT_LOCKED` where the file system has no locks."""
    while True:
        with _write_errors(path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "?"
            os.close(fd)
            raise ImatrixError(f"{path}: another process (pid {holder}) is writing it; two runs writing one "
                               "output would overwrite each other") from None
        except OSError:  # a file system without locks (some network ones): write unguarded, as before
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            return NOT_LOCKED
        # its previous holder may have removed the file between our open and our lock: lock the new one
        if _same_file(fd, lock_path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _unlock(lock_path: Path, fd: int) -> None:
    if fd == NOT_LOCKED:
        return
    # removed while still locked, so that a waiter holding the old file sees it is gone (`_lock`)
    with contextlib.suppress(OSError):
        os.unlink(lock_path)
    os.close(fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Our temporary files of `target` (`_temporary_beside`'s names, regular files of this user): with the
    output claimed, no live writer owns any of them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(_parent(target)):
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if pattern.fullmatch(entry.name) and stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                    os.unlink(entry.path)
                    removed.append(entry.name)
    if removed:
        warnings.warn(f"{target}: removed {len(removed)} temporary file(s) left by an interrupted run "
                      f"({', '.join(removed)})", ImatrixWarning, stacklevel=4)
