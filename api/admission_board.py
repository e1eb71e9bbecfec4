"""The keys being admitted, shared by the API processes of one host.

Each API process knows the keys of the requests it holds (api/admission.py), so a
repeat that reaches the process holding its first request is answered at once: 409
while the first is queued or starting its payment, the ledger's answer once its row
is open. With several API processes on one listening socket, a repeat reaches another
process as often as not, and that process, knowing nothing of the first, took it for a
new payment: its start was refused as a duplicate only once the Temporal server got to
it, seconds into a storm (p99 5.3 s in the storm benchmark, docs/scaling.md). On the
board each process writes the keys it is admitting, and every process reads it before
it takes a key for new.

The board is a file in shared memory (``/dev/shm``) that ``python -m api`` creates
before it starts its processes and removes when they are gone. It holds one region per
process, an open-addressing table written by its owner alone: a process claims a
region with an exclusive ``flock`` on the region's lock file, which the kernel releases
when the process dies, so a replacement process takes its place. A slot holds a key's
fingerprint (128 bits of BLAKE2b over the Authorization header and the key: never the
credential or the key), the monotonic time by which its request will have its answer,
and what the request is doing (queued for its turn or for room; starting the run). The
entry is withdrawn once the payment's row is open or the request has its answer, and
past its time it counts for nothing, so a process that died leaves nothing that
outlives its requests.

No lock guards a slot: a reader may see an entry a moment before or after its owner
writes it. At worst a repeat is taken for new (the start's own conflict check still
lets one run per key) or a key just withdrawn is answered 409 once (its client
retries). The board decides how fast a repeat is answered, never whether a payment is
charged.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from struct import Struct

# fingerprint (two 64-bit halves), answer by (time.monotonic()), what it is doing
_SLOT = Struct("<QQdQ")
# Slots per process: 1,000 requests in flight in one process fill an eighth of them.
SLOTS = 8192
_MASK = SLOTS - 1
# How far from its home slot an entry may lie; a key that finds no room within this
# many is not published (its repeats elsewhere take the slower, still correct, path).
PROBES = 8
REGION_BYTES = SLOTS * _SLOT.size

Fingerprint = tuple[int, int]


class Holding(enum.IntEnum):
    QUEUED = 1  # in the admission line or queued for room: nothing has started
    STARTING = 2  # its run's start is sent, its row not yet open


@dataclass(frozen=True)
class Held:
    """A key another process is admitting."""

    answer_by: float  # time.monotonic() by which that request will have its answer
    starting: bool


def default_board_path(owner_pid: int) -> Path:
    """Where ``python -m api`` (process ``owner_pid``) puts its processes' board."""
    shm = Path("/dev/shm")  # noqa: S108 - shared memory, not a temporary file
    directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return directory / f"payments-admission-{owner_pid}"


def _lock_path(path: Path, region: int) -> Path:
    return path.with_name(f"{path.name}.{region}.lock")


def create_board(path: Path, processes: int) -> None:
    """A zeroed board for ``processes`` API processes, readable by this user only. A
    board already at ``path`` is one a killed ``python -m api`` left (the name holds
    the creator's pid, and a pid is reused): it is replaced."""
    remove_board(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, processes * REGION_BYTES)
    finally:
        os.close(fd)


def remove_board(path: Path) -> None:
    """The board and its lock files, once no process uses them."""
    regions = path.stat().st_size // REGION_BYTES if path.exists() else 0
    for region in range(regions):
        _lock_path(path, region).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def fingerprint(ids: tuple[bytes, bytes]) -> Fingerprint:
    """(Authorization, Idempotency-Key) as sent, in 128 bits."""
    digest = hashlib.blake2b(ids[0] + b"\0" + ids[1], digest_size=16).digest()
    high, low = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return high, low or 1  # (0, 0) marks a slot never used


class AdmissionBoard:
    """This process's view of the board: its own region to write, the others to read."""

    def __init__(self, memory: mmap.mmap, regions: int, own: int | None, lock_fd: int | None):
        self._memory = memory
        self._regions = regions
        self._own = own
        self._lock_fd = lock_fd
        # Where each of this process's entries is, so updating or withdrawing it is one
        # write.
        self._mine: dict[Fingerprint, int] = {}
        self._others = [r * REGION_BYTES for r in range(regions) if r != own]
        self._closed = False

    @classmethod
    def attach(cls, path: Path) -> AdmissionBoard:
        """Map the board and claim a free region; with none free (more processes than
        ``python -m api`` made room for), this process reads the board but writes
        nothing on it."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the file
        regions = size // REGION_BYTES
        for region in range(regions):
            lock_fd = os.open(_lock_path(path, region), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue
            # Whatever a process that held it before left is this one's to clear.
            start = region * REGION_BYTES
            memory[start : start + REGION_BYTES] = bytes(REGION_BYTES)
            return cls(memory, regions, region, lock_fd)
        return cls(memory, regions, None, None)

    @property
    def region(self) -> int | None:
        """The region this process writes, if it has one."""
        return self._own

    def close(self) -> None:
        """Clear and release this process's region; a request still running after
        this (a shutdown's last) publishes and finds nothing."""
        if self._closed:
            return
        self._closed = True
        if self._own is not None:
            start = self._own * REGION_BYTES
            self._memory[start : start + REGION_BYTES] = bytes(REGION_BYTES)
        self._mine.clear()
        self._memory.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the region
            self._lock_fd = None

    def publish(self, key: Fingerprint, answer_by: float, holding: Holding) -> bool:
        """Write (or update) this process's entry for ``key``; False if there is no
        room for it."""
        if self._closed:
            return False
        offset = self._mine.get(key)
        if offset is None:
            offset = self._free_slot(key)
            if offset is None:
                return False
            self._mine[key] = offset
        _SLOT.pack_into(self._memory, offset, key[0], key[1], answer_by, holding)
        return True

    def withdraw(self, key: Fingerprint) -> None:
        offset = self._mine.pop(key, None)
        if offset is not None and not self._closed:
            # The fingerprint stays: readers stop only at a slot never used.
            _SLOT.pack_into(self._memory, offset, key[0], key[1], 0.0, 0)

    def held_elsewhere(self, key: Fingerprint) -> Held | None:
        """The entry of another process that is admitting ``key``, if one is."""
        if self._closed:
            return None
        now = time.monotonic()
        high, low = key
        memory = self._memory
        for base in self._others:
            for probe in range(PROBES):
                offset = base + ((high + probe) & _MASK) * _SLOT.size
                slot_high, slot_low, answer_by, holding = _SLOT.unpack_from(memory, offset)
                if slot_high == high and slot_low == low:
                    if answer_by > now:
                        return Held(answer_by, holding == Holding.STARTING)
                elif slot_high == 0 and slot_low == 0:
                    break  # an entry is never placed past a slot never used
        return None

    def _free_slot(self, key: Fingerprint) -> int | None:
        if self._own is None:
            return None
        now = time.monotonic()
        base = self._own * REGION_BYTES
        for probe in range(PROBES):
            offset = base + ((key[0] + probe) & _MASK) * _SLOT.size
            _, _, answer_by, _ = _SLOT.unpack_from(self._memory, offset)
            if answer_by <= now:  # never used, withdrawn, or past its time
                return offset
        return None


class BoardClaim:
    """One request's entry: published when its process takes its key for new, kept
    in step with what it is doing, withdrawn once its row is open or it has its
    answer."""

    __slots__ = ("_answer_by", "_board", "_key")

    def __init__(self, board: AdmissionBoard, key: Fingerprint, answer_by: float) -> None:
        self._board = board
        self._key = key
        self._answer_by = answer_by
        board.publish(key, answer_by, Holding.QUEUED)

    def queued(self) -> None:
        self._board.publish(self._key, self._answer_by, Holding.QUEUED)

    def starting(self) -> None:
        self._board.publish(self._key, self._answer_by, Holding.STARTING)

    def withdraw(self) -> None:
        self._board.withdraw(self._key)
