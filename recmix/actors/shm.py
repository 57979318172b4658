"""Same-node transfer buffers: a file in /dev/shm per (client, shard), mapped by both processes.

Pull results of 10^4-10^5 rows are megabytes; through the object store every such object is a fresh
allocation whose first-touch page faults cost more than the gather itself on a small machine
(storage.md 9.3). A buffer that both processes keep mapped is faulted in once and then reused: the
client writes the request ids into it, the shard gathers rows straight into it, and only small
descriptors travel as Ray arguments. A shard on another node cannot open the file and answers
through the object store instead. One buffer serves one synchronous pull at a time (the client
waits for the answer before reusing it); pushes never use it.
"""

from __future__ import annotations

import atexit
import mmap
import os
import uuid

import numpy as np

from recmix.platform import cleanup

SHM_DIR = cleanup.SHM_DIR
ALIGN = 64


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Buffer:
    """Client side: owns the file; grows by replacing it with a larger one (new name)."""

    def __init__(self, tag: str):
        self.tag, self.path, self.size, self.mm = tag, None, 0, None

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        self.close()
        size = max(1 << 20, 1 << (nbytes - 1).bit_length())
        _sweep_once()
        # The creator's pid is in the name: after a SIGKILL the next run removes the file (platform/cleanup.py).
        self.path = os.path.join(SHM_DIR, cleanup.shm_name("ps", self.tag, uuid.uuid4().hex[:10]))
        # Owner-only (0600), never an existing file: rows of the embedding tables pass through it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _LIVE.add(self.path)
        with os.fdopen(fd, "w+b") as f:
            f.truncate(size)
            self.mm = mmap.mmap(f.fileno(), size)
        self.size = size

    def view(self, dtype, offset: int, shape) -> np.ndarray:
        n = int(np.prod(shape))
        return np.frombuffer(self.mm, dtype=dtype, count=n, offset=offset).reshape(shape)

    def close(self) -> None:
        if self.path:
            _LIVE.discard(self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.path, self.size, self.mm = None, 0, None      # views still held keep the old mapping alive

    def __del__(self):
        self.close()


# Buffers of this process still open: removed at exit (Ctrl-C ends in a normal exit), where `__del__` may not run.
_LIVE: set[str] = set()
_SWEPT = False


def _sweep_once() -> None:
    global _SWEPT
    if not _SWEPT:
        _SWEPT = True
        cleanup.sweep_stale()


@atexit.register
def _remove_live() -> None:
    for path in list(_LIVE):
        try:
            os.unlink(path)
        except OSError:
            pass
    _LIVE.clear()


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Attached:
    """Shard side: maps client buffers by path (cached; a new path means the client grew its buffer)."""

    def __init__(self):
        self.maps: dict[str, mmap.mmap] = {}

    def get(self, path: str):
        mm = self.maps.get(path)
        if mm is None:
            try:
                with open(path, "r+b") as f:
                    mm = mmap.mmap(f.fileno(), 0)
            except OSError:
                return None                                  # another node: answer through the object store
            if len(self.maps) > 64:
                self.maps.clear()
            self.maps[path] = mm
        return mm
