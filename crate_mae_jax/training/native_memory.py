"""Keeps a long run's resident memory flat where glibc's malloc would let it creep.

Every asynchronous checkpoint save runs in threads of its own (Orbax starts them per
save), and glibc gives threads their own malloc arenas (up to 8 per core). Memory that
a finished save freed stays mapped in those arenas, scattered, so a run's RSS creeps
by tens of KiB per save although nothing is alive (BENCHMARKS.md, "Resident memory over
a long run"). `release_free_memory()`, called after each save is handed off, gives the
free pages of every arena back to the kernel (`malloc_trim(0)`). Elsewhere than glibc
it does nothing.
"""
import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _glibc():
  """glibc's handle, or None (musl, macOS, or no malloc_trim)."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
  except (OSError, AttributeError):
    return None
  return libc


def release_free_memory() -> bool:
  """Returns the free pages of every malloc arena to the kernel; False where not glibc."""
  libc = _glibc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  return True
