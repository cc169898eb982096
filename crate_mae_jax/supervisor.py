"""One process of a multi-process job ends with our one line, however it ends.

JAX's coordination service ends a process itself when the job loses a member: when the
coordinator (process 0) goes, every other process aborts at once (SIGABRT) on a failed
error poll; when another process goes, the coordinator notices its heartbeats missing
after `heartbeat_timeout_seconds` and aborts every survivor the same way. Its report is
printed from C++ and the process dies in `abort()`, so no Python code runs after it: the
handler JAX offers (`missed_heartbeat_callback`) fails to convert its argument in
jaxlib 0.10 and terminates the process all the same.

So a multi-process run is split in two before JAX starts its distributed client:
`supervise()` forks; the child returns and runs the job as before (same process group,
same stdout; its stderr goes through a pipe that the parent copies on, keeping the
tail); the parent only waits. When the child exits, the parent exits with its code. When
a signal ends the child (JAX's abort, the kernel's OOM killer, `kill -9` of the child),
the parent reads JAX's report in the tail to name the process that was lost, prints
`error: ...` with the last complete checkpoint and the rerun, and exits 1.

Signals: SIGTERM, SIGUSR1 and SIGUSR2 sent to the parent (a launcher's `kill PID`) are
passed on to the child. SIGINT and SIGHUP from the terminal reach the whole foreground
process group, the child included, so the parent passes on only those that a process
sent it (`kill -INT PID`). The child dies with the parent (PR_SET_PDEATHSIG on Linux),
so `kill -9` of the launched process still ends the whole run.
"""
import ctypes
import os
import re
import signal
import sys
import threading

# What JAX's coordination service prints when it ends a process (jaxlib 0.10).
UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+?)\s*\n")
POLL = "PollForError"
LOST_COORDINATOR = ("Failed to send RPC to coordination service", "Socket closed",
                    "Connection reset by peer", "Connection refused")
FATAL = "JAX distributed service detected fatal errors"
PR_SET_PDEATHSIG = 1
TAIL_BYTES = 64 * 1024
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
FROM_TERMINAL = (signal.SIGINT, signal.SIGHUP)


def supervise(failure_line) -> None:
  """Forks. Returns in the child, which runs the job; the parent waits for it and
  ends with its exit code, or with `failure_line(tail, signal_number)` (one line,
  without 'error: ') and exit code 1 when a signal ended it. Call before JAX starts
  any thread."""
  sys.stdout.flush()
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  handled = set(FORWARDED + FROM_TERMINAL + (signal.SIGCHLD,))
  old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
  parent = os.getpid()
  child = os.fork()
  if child == 0:
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _die_with(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return
  os.close(write_end)
  tail = bytearray()
  pump = threading.Thread(target=_copy, args=(read_end, tail), daemon=True)
  pump.start()
  status = _wait(child, handled)
  pump.join(timeout=5)  # the pipe closes when the child (and anything it started) is gone
  if os.WIFEXITED(status):
    os._exit(os.WEXITSTATUS(status))  # pylint: disable=protected-access
  line = failure_line(bytes(tail).decode(errors="replace"), os.WTERMSIG(status))
  try:
    os.write(2, f"\nerror: {' '.join(line.split())}\n".encode())
  except OSError:  # the terminal is gone
    pass
  os._exit(1)  # pylint: disable=protected-access


def _die_with(parent: int) -> None:
  """The child gets SIGKILL when the parent dies (Linux; elsewhere nothing)."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)  # pylint: disable=protected-access


def _copy(fd: int, tail: bytearray) -> None:
  """Copies the child's stderr to ours, keeping the last TAIL_BYTES."""
  while True:
    try:
      data = os.read(fd, 65536)
    except OSError:
      return
    if not data:
      return
    tail.extend(data)
    del tail[:-TAIL_BYTES]
    try:
      while data:
        data = data[os.write(2, data):]
    except OSError:  # a closed terminal: keep draining so that the child never blocks
      pass


def _wait(child: int, handled) -> int:
  """Waits for the child, passing signals on; returns its wait status."""
  while True:
    info = signal.sigwaitinfo(handled)
    if info.si_signo == signal.SIGCHLD:
      pid, status = os.waitpid(child, os.WNOHANG)
      if pid == child and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        return status
      continue
    # si_code <= 0: sent by a process (kill, sigqueue, tkill); > 0: by the kernel (a
    # terminal's Ctrl-C or hang-up, which the child's process group received as well).
    if info.si_signo in FORWARDED or info.si_code <= 0:
      try:
        os.kill(child, info.si_signo)
      except ProcessLookupError:
        pass


def lost_member(tail: str) -> str:
  """What JAX's report in `tail` says the job lost, in words ('' if it says nothing)."""
  found = UNHEALTHY.findall(tail)
  if found:
    ids = sorted({int(i) for i in re.findall(r"\d+", found[-1])})
    which = ", ".join(map(str, ids))
    return (f"process{'es' if len(ids) > 1 else ''} {which} of the job stopped sending "
            "heartbeats (killed, crashed, hung, or its host was lost)")
  if FATAL in tail and POLL in tail and any(s in tail for s in LOST_COORDINATOR):
    return ("the job's coordinator, process 0, is gone (killed, crashed, or its host was "
            "lost)")
  if FATAL in tail:
    return "another process of the job died"
  return ""
