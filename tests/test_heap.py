"""`keep_freed_memory`: malloc serves activation-sized blocks from its heap and keeps them when freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from imatrix.models.heap import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_an_8_mb_block_comes_from_the_heap_and_stays_there_when_freed() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert keep_freed_memory()
    before = libc.mallinfo2()
    block = libc.malloc(8 << 20)
    ctypes.memset(block, 1, 8 << 20)
    held = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    assert held.hblkhd == before.hblkhd  # not a separate mmap (glibc's default above 128 KB at first)
    assert held.uordblks - before.uordblks >= 8 << 20
    assert after.arena == held.arena and after.fordblks >= 8 << 20  # freed, not trimmed back to the kernel


ARENA_COUNT = """
import ctypes, ctypes.util, sys, threading
from imatrix.models.heap import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    keep_freed_memory()
thread = threading.Thread(target=lambda: libc.free(libc.malloc(1 << 20)))
thread.start()
thread.join()
buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(buffer.value.decode().count("<heap nr="))
"""


def test_threads_share_one_arena() -> None:
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_info"):
        pytest.skip("not glibc")
    arenas = {mode: int(subprocess.run([sys.executable, "-c", ARENA_COUNT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert arenas == {"default": 2, "keep": 1}
