"""Writing outputs: atomic replacement, and what is not a plain file (links, devices, directories)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from imatrix import ImatrixError
from imatrix.errors import ImatrixWarning
from imatrix.formats.atomic import atomic_path, check_output_path, claimed_output


def write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    write(out, b"new")
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    write(out, b"new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_a_symlink_keeps_pointing_at_its_file(tmp_path: Path) -> None:
    real, link = tmp_path / "real.bin", tmp_path / "link.bin"
    real.write_bytes(b"old")
    link.symlink_to(real)
    write(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_a_device_is_written_through_not_replaced() -> None:
    devnull = Path(os.devnull)
    mode = devnull.stat().st_mode
    check_output_path(devnull)
    write(devnull, b"discarded")
    assert devnull.is_char_device() and devnull.stat().st_mode == mode


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(ImatrixError, match="is a directory"):
        write(tmp_path, b"x")
    with pytest.raises(ImatrixError, match="empty"):
        check_output_path("")


def test_os_errors_while_writing_name_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with pytest.raises(ImatrixError, match=r"out.bin: cannot write: No space left on device"), atomic_path(out):
        raise OSError(28, "No space left on device")
    assert not out.exists()


def test_an_unwritable_directory_is_found_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # root may write anywhere: simulate the file system
    with pytest.raises(ImatrixError, match="out.gguf: cannot write: Read-only file system"):
        check_output_path(tmp_path / "out.gguf")


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_temporaries_a_killed_writer_left_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    for name in (".out.gguf.k5t5k2lc.tmp", ".out.gguf.mine.tmp", ".other.gguf.k5t5k2lc.tmp"):
        (tmp_path / name).write_bytes(b"half")
    with pytest.warns(ImatrixWarning, match=r"out\.gguf: removed 1 temporary file\(s\) left by an interrupted run "
                                            r"\(\.out\.gguf\.k5t5k2lc\.tmp\)"):
        write(out, b"new")
    # only this output's, and only names the writer makes: another output's and a user's file stay
    assert names(tmp_path) == [".other.gguf.k5t5k2lc.tmp", ".out.gguf.mine.tmp", "out.gguf"]


def test_claims_nest_within_a_process_and_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with claimed_output(out):
        assert (tmp_path / ".out.bin.lock").read_text() == f"{os.getpid()}\n"
        write(out, b"a")
        check_output_path(out)
        assert names(tmp_path) == [".out.bin.lock", "out.bin"]
    assert names(tmp_path) == ["out.bin"]


def test_a_lock_file_left_by_a_killed_writer_is_no_obstacle(tmp_path: Path) -> None:
    (tmp_path / ".out.bin.lock").write_text("12345\n")  # its lock died with the process
    write(tmp_path / "out.bin", b"new")
    assert names(tmp_path) == ["out.bin"]


def test_a_file_system_without_locks_is_written_unguarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    def no_locks(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / ".out.bin.k5t5k2lc.tmp").write_bytes(b"half")  # maybe a live writer's: kept
    write(tmp_path / "out.bin", b"new")
    assert names(tmp_path) == [".out.bin.k5t5k2lc.tmp", "out.bin"]
