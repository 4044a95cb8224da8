"""Atomic file replacement: a crash mid-write never destroys the previous file."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imatrix.errors import ImatrixError


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
    os.unlink(_temporary_beside(target, path))


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
    tmp = _temporary_beside(target, path)
    try:
        # mkstemp makes 0600: give the file the old one's mode, or what the umask allows a new file
        mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with _write_errors(path):
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
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot write: {exc.strerror or exc}") from exc
