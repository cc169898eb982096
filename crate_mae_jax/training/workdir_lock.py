"""One run per workdir: an advisory lock held for the life of the process.

Two runs writing one workdir would delete and overwrite each other's
checkpoints. `acquire` takes an exclusive `fcntl.flock` on `<workdir>/.lock`
(one file per process of a multi-host run, so every process of a second run is
refused, not only the first). The operating system drops the lock when the
process dies, even by `kill -9`, so a stale lock never blocks a restart; the
file's text (pid, host, start time) only serves to name the running holder.
Object stores (gs://) and file systems without locks are not locked (logged).
"""
import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _path(workdir: str, process_index: int) -> str:
  name = ".lock" if process_index == 0 else f".lock.process_{process_index}"
  return os.path.join(workdir, name)


def acquire(workdir: str, process_index: int = 0):
  """Returns an open lock file to keep for the life of the run (None where the
  file system cannot lock); raises WorkdirBusyError naming the holder."""
  if "://" in workdir:
    logging.info("Not locking %s: object stores have no file locks; run one job per workdir",
                 workdir)
    return None
  path = _path(workdir, process_index)
  # Held through a read-only descriptor: a file open for writing for the whole
  # run would keep its file system from being remounted read-only.
  try:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:   # a link: the holder's line would be written through it
      raise WorkdirBusyError(f"--workdir {workdir!r}: {os.path.basename(path)} is a symbolic "
                             "link, not the run's lock file; delete it and rerun") from None
    raise
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirBusyError(
          f"--workdir {workdir!r} is in use by another run ({_describe(path)}); wait for it "
          "to finish or stop it, or pick another --workdir") from None
    logging.warning("Not locking %s (%s): this file system has no locks; run one job per "
                    "workdir", workdir, os.strerror(e.errno or 0))
    return None
  with os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "w") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds")}, f)
  return os.fdopen(fd, "r")


def _describe(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"


def held(workdir: str) -> bool:
  """Whether a live run holds `workdir` (readers use it to expect steps that
  appear and vanish). Takes a shared lock for the instant of the probe only."""
  if "://" in workdir:
    return False
  try:
    fd = os.open(_path(workdir, 0), os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
  else:
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  finally:
    os.close(fd)
