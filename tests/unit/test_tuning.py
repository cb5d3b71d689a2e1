"""The daemon's malloc tuning applies on glibc (these machines): large I/O buffers come from the heap."""
import subprocess
import sys

from iscsi.target import tuning

PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = (ctypes.c_ssize_t,)
if sys.argv[1] == "tuned":
    from iscsi.target.tuning import tune_malloc
    assert tune_malloc()
block = libc.malloc(1 << 20)          # a 1 MiB Data-In buffer
print("heap" if block < libc.sbrk(0) else "mmap")
"""


def _where(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_tune_malloc_applies_on_glibc():
    assert tuning.tune_malloc() is True
    assert tuning.tune_malloc() is True  # idempotent


def test_large_buffers_move_from_mmap_to_the_heap():
    assert _where("plain") == "mmap"   # glibc default: >128 KiB blocks are fresh mappings each time
    assert _where("tuned") == "heap"   # tuned: reused heap memory, no page faults per read
