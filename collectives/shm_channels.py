"""The channels of collectives.shm: files, doorbells and their collective set-up.

Every directed pair of local ranks (src -> dst) has a channel: a ring of
``slots`` slots of ``slot_bytes`` bytes in a file under ``/dev/shm`` that both
ranks map shared (a header of per-slot byte counts first), and two named FIFOs
used as doorbells, "data" (src -> dst) and "credit" (dst -> src).

Set-up is collective over the group: the ranks agree on the slot geometry and
on which pairs are local, rank 0 broadcasts a fresh directory name, each rank
creates its incoming channels (buffer file, space reserved up front so a full
``/dev/shm`` fails here rather than with a SIGBUS later, and both FIFOs), every
rank opens its FIFO read ends, then its write ends, and maps the buffers. Then
every file, FIFO and the directory are unlinked: the mappings and descriptors
keep the channels alive, and nothing is left in ``/dev/shm`` whatever happens
to the processes later. Every step ends with a gloo all-reduce of per-rank
error flags, so a failure on one rank raises on all of them instead of leaving
the others blocked.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections import deque

import torch
import torch.distributed as dist

MAX_SLOTS = 4096  # a FIFO holds at most `slots` doorbell bytes; a pipe holds at least 4096 bytes
SHM_DIR = "/dev/shm"


class Channel:
    """One direction of a local pair, seen from this rank: ``out`` (this rank sends) or ``in``."""

    __slots__ = ("peer", "out", "hdr", "slots", "nslots", "slot_bytes", "index", "avail",
                 "read_fd", "write_fd", "queue", "error", "messages")

    def __init__(self, peer: int, out: bool, mem: torch.Tensor, nslots: int, slot_bytes: int,
                 read_fd: int, write_fd: int) -> None:
        self.peer, self.out = peer, out
        hdr_bytes, stride = layout(nslots, slot_bytes)
        self.hdr = mem[:hdr_bytes].view(torch.int64).numpy()  # per slot: byte count of its message
        self.slots = [mem[hdr_bytes + i * stride:hdr_bytes + i * stride + slot_bytes] for i in range(nslots)]
        self.nslots, self.slot_bytes = nslots, slot_bytes
        self.index = 0  # next slot to fill (out) or to drain (in)
        self.avail = nslots if out else 0  # credits (out) or filled slots announced (in)
        # out: read credits, write data doorbells; in: read data doorbells, write credits
        self.read_fd, self.write_fd = read_fd, write_fd
        self.queue: deque = deque()  # collectives.shm's pending transfers, in posting order
        self.error: BaseException | None = None
        self.messages = 0  # messages started (in: for error messages)


def layout(nslots: int, slot_bytes: int) -> tuple[int, int]:
    """(header bytes, slot stride) of a channel file: headers first, slots 64-byte aligned."""
    hdr = -(-8 * nslots // 4096) * 4096
    return hdr, -(-slot_bytes // 64) * 64


def close_fds(fds: list[int]) -> None:
    """Close and forget every descriptor in ``fds`` (some may be closed already)."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _agree(group: dist.ProcessGroup, rank: int, size: int, err: BaseException | None, step: str) -> None:
    """A barrier that also tells every rank whether any rank failed ``step``."""
    flags = torch.zeros(size, dtype=torch.int32)
    flags[rank] = err is not None
    dist.all_reduce(flags, group=group)
    bad = flags.nonzero().flatten().tolist()
    if err is not None:
        raise RuntimeError(f"rank {rank}: shared-memory set-up failed ({step}): {err}") from err
    if bad:
        who = f"rank {bad[0]}" if len(bad) == 1 else "ranks " + ", ".join(map(str, bad))
        raise RuntimeError(f"rank {rank}: shared-memory set-up failed on {who} ({step}); "
                           f"see the error raised there")


def open_channels(group: dist.ProcessGroup, rank: int, size: int, first: int, mask: list[bool], slot_bytes: int,
                  slots: int, opened: list[int]) -> tuple[list[Channel | None], list[Channel | None]]:
    """Set up this rank's channels with the peers ``mask`` marks local (see the module note);
    collective over ``group``, whose rank 0 is global rank ``first``. Returns the outgoing and the
    incoming channel per peer (None: not local); every descriptor opened is added to ``opened``."""
    n, me = size, rank
    # Every rank's geometry and view of which peers are local, in one all-reduce (no pickling).
    table = torch.zeros(n, n + 2, dtype=torch.int64)
    table[me, 0], table[me, 1] = slot_bytes, slots
    table[me, 2:] = torch.tensor(mask, dtype=torch.int64)
    dist.all_reduce(table, group=group)
    geometry = {tuple(row[:2]) for row in table.tolist()}
    if len(geometry) > 1:
        raise ValueError(f"rank {me}: ranks disagree on the shared-memory slots (slot_bytes, slots): "
                         f"{[tuple(row[:2]) for row in table.tolist()]}; set TOPOCOMM_SHM_SLOT_BYTES/"
                         f"TOPOCOMM_SHM_SLOTS alike everywhere")
    local = table[:, 2:].bool()
    asym = (local != local.t()).nonzero().tolist()
    if asym:
        a, b = asym[0]
        raise ValueError(f"rank {me}: peers_local disagrees between ranks: rank {a} marks rank {b} "
                         f"{'local' if local[a, b] else 'remote'} but rank {b} marks rank {a} "
                         f"{'local' if local[b, a] else 'remote'}")
    outs: list[Channel | None] = [None] * n
    ins: list[Channel | None] = [None] * n
    if not bool(local.any()):
        return outs, ins
    peers = [p for p in range(n) if local[me, p]]
    name = torch.zeros(16, dtype=torch.uint8)
    if me == 0:
        name.copy_(torch.frombuffer(bytearray(uuid.uuid4().bytes), dtype=torch.uint8))
    dist.broadcast(name, src=first, group=group)
    base = os.environ.get("TOPOCOMM_SHM_DIR", SHM_DIR)
    root = os.path.join(base, "topocomm-" + bytes(name.tolist()).hex())
    hdr_bytes, stride = layout(slots, slot_bytes)
    file_bytes = hdr_bytes + slots * stride

    def path(src: int, dst: int, kind: str) -> str:
        return os.path.join(root, f"{src}-{dst}.{kind}")

    created: list[str] = []
    mems: dict[tuple[int, int], torch.Tensor] = {}
    fds: dict[tuple[int, int, str], int] = {}
    try:
        err: BaseException | None = None
        try:  # this rank creates its incoming channels
            if peers:
                try:
                    os.mkdir(root, 0o700)
                except FileExistsError:
                    pass
            for p in peers:
                buf = path(p, me, "buf")
                fd = os.open(buf, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                created.append(buf)
                try:
                    os.posix_fallocate(fd, 0, file_bytes)  # reserve now: a full tmpfs fails here, not later
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    raise OSError(e.errno, f"{base} is full: each rank needs {len(peers)} x "
                                  f"{file_bytes / 2**20:.1f} MiB for its channels (lower "
                                  f"TOPOCOMM_SHM_SLOT_BYTES or TOPOCOMM_SHM_SLOTS, or grow {base})") from e
                finally:
                    os.close(fd)
                for kind in ("data", "credit"):
                    os.mkfifo(path(p, me, kind), 0o600)
                    created.append(path(p, me, kind))
        except Exception as e:  # noqa: BLE001 - reported on every rank by _agree
            err = e
        _agree(group, me, n, err, f"creating channels under {base}")
        try:  # read ends first: opening a FIFO's write end without a reader fails (ENXIO)
            for p in peers:
                fds[(p, me, "data")] = _open(opened, path(p, me, "data"), os.O_RDONLY)
                fds[(me, p, "credit")] = _open(opened, path(me, p, "credit"), os.O_RDONLY)
        except Exception as e:  # noqa: BLE001
            err = _hint(e, peers)
        _agree(group, me, n, err, "opening doorbell read ends")
        try:
            for p in peers:
                fds[(p, me, "credit")] = _open(opened, path(p, me, "credit"), os.O_WRONLY)
                fds[(me, p, "data")] = _open(opened, path(me, p, "data"), os.O_WRONLY)
                mems[(p, me)] = torch.from_file(path(p, me, "buf"), shared=True, size=file_bytes,
                                                dtype=torch.uint8)
                mems[(me, p)] = torch.from_file(path(me, p, "buf"), shared=True, size=file_bytes,
                                                dtype=torch.uint8)
        except Exception as e:  # noqa: BLE001
            err = _hint(e, peers)
        _agree(group, me, n, err, "opening doorbell write ends and mapping buffers")
    finally:
        # Mapped and opened everywhere (or failed everywhere): the names are no longer needed.
        for f in created:
            try:
                os.unlink(f)
            except OSError:
                pass
        try:
            os.rmdir(root)  # the last rank of this host to get here removes it
        except OSError:
            pass
    for p in peers:
        outs[p] = Channel(p, True, mems[(me, p)], slots, slot_bytes,
                                 fds[(me, p, "credit")], fds[(me, p, "data")])
        ins[p] = Channel(p, False, mems[(p, me)], slots, slot_bytes,
                                fds[(p, me, "data")], fds[(p, me, "credit")])
    return outs, ins


def _open(opened: list[int], p: str, flags: int) -> int:
    fd = os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    opened.append(fd)
    return fd


def _hint(e: BaseException, peers: list[int]) -> BaseException:
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(e.errno, f"{e} (peers_local marks ranks {peers} local to this rank: are they "
                                          f"on another host, or another /dev/shm namespace?)")
    return e
