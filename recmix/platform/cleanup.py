"""What a run leaves on the machine, and how the next run removes what a killed one left.

A run's leftovers carry the pid of the process that made them in their names:
* `/tmp/rmx-<pid>-*`: the temp dir of a local Ray cluster started by that driver (logs, sockets, session);
* `/dev/shm/recmix-*-p<pid>-*`: parameter-server transfer buffers created by that process.
A normal end or Ctrl-C removes them (cluster.shutdown, atexit). After SIGKILL nothing runs, so every start
(`sweep_stale`) removes the leftovers of dead pids owned by this user, stopping first any process still
running from a dead driver's temp dir (the processes Ray started for it).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager
from typing import Iterator

TEMP_ROOT = "/tmp"
TEMP_PREFIX = "rmx-"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "recmix-"
_TEMP_RE = re.compile(rf"^{TEMP_PREFIX}(\d+)-")
_SHM_RE = re.compile(rf"^{SHM_PREFIX}.*-p(\d+)-")


def temp_prefix() -> str:
    """`tempfile.mkdtemp(prefix=...)` for this process's cluster temp dir."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def shm_name(kind: str, tag: str, unique: str) -> str:
    return f"{SHM_PREFIX}{kind}-p{os.getpid()}-{tag}-{unique}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mine(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def processes_using(path: str) -> list[int]:
    """Pids of this user's processes whose command line mentions `path` (Ray's processes name their temp dir)."""
    me, out = os.getuid(), []
    needle = path.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


def stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace_s` (Ray's gcs/raylet may ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids if alive(p)]
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if alive(p) and not _zombie(p)]
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def remove_temp_dir(path: str) -> None:
    """Stop every process still running from `path`, then delete it."""
    for _ in range(2):  # a second look catches a process that was being exec'd during the first
        stop_processes(processes_using(path))
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Remove temp dirs and shared-memory buffers of dead processes of this user; returns what went."""
    gone = []
    for path in glob.glob(os.path.join(TEMP_ROOT, f"{TEMP_PREFIX}*")):
        m = _TEMP_RE.match(os.path.basename(path))
        if m and _mine(path) and not alive(int(m.group(1))):
            remove_temp_dir(path)
            gone.append(path)
    for path in glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}*")):
        m = _SHM_RE.match(os.path.basename(path))
        if m and _mine(path) and not alive(int(m.group(1))):
            try:
                os.unlink(path)
                gone.append(path)
            except OSError:
                pass
    return gone


@contextmanager
def no_interrupt() -> Iterator[None]:
    """Hold off Ctrl-C while cleaning up (a second Ctrl-C would cut the cleanup short); main thread only."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: pending.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
