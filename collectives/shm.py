"""Shared-memory transport for CPU ranks on the same host.

``ShmTransport`` moves the bytes of transfers between ranks of one host
through shared memory and hands every other transfer to a wrapped
``TorchTransport`` (gloo), so one transport serves a multi-node job: shared
memory inside a node, gloo across nodes.

Channels. Every directed pair of local ranks (src -> dst) has its own
channel: a ring of ``slots`` slots of ``slot_bytes`` bytes in a file under
``/dev/shm`` that both ranks map shared, and two named FIFOs used as
doorbells. The sender copies the next piece of a message into a free slot
(with the message's byte count in the slot's header) and writes one byte to
the channel's "data" FIFO; the receiver reads it, copies the piece out and
writes one byte to the "credit" FIFO, which gives the slot back. Slots are
used in order around the ring, so a byte on a FIFO always means "the next
slot". A sender holds at most ``slots`` credits, so a FIFO never holds more
than ``slots`` bytes and a doorbell write never blocks. Messages larger than
a slot travel in several pieces; consecutive messages to one peer are matched
in posting order (the k-th receive posted for a peer gets the k-th message it
sends), and the receiver checks each message's byte count against its own.
Zero-byte transfers complete at once and take no part in the matching (both
ends skip them, as the executor does).

Progress engine. ``post`` only queues the transfers (and moves whatever can
move without blocking); there is no background thread. ``wait()`` on any
transfer advances every pending shared-memory transfer of the transport, all
channels, both directions, until that transfer is done; when nothing can
move it blocks in ``poll`` on the FIFOs it needs (a credit for a blocked
sender, a data byte for a blocked receiver), so waiting ranks sleep instead
of spinning. Only where the rank's CPU set has a core for every local rank
does a wait first poll without sleeping, for up to 100 us
(``TOPOCOMM_SHM_SPIN_US``): waking a sleeping process can cost more than
that (on virtual machines especially), and with cores to spare the spin
takes no other rank's time. Because a waiting rank also drains its receives
and returns credits, waits may come in any order (sends before receives
included) without deadlock wherever a rendezvous transport would not
deadlock either.
While shared-memory transfers are pending, waiting on a gloo transfer of the
same transport keeps them moving too. The flip side: transfers only move
while this rank is inside ``post`` or a ``wait``, so a rank that posts a
message larger than the ring and then blocks elsewhere (another process
group, a long computation) stalls the receiver until it waits.

Failures. A wait that makes no progress for longer than ``timeout`` raises
``PeerTimeoutError`` naming the peer it waits on. A peer that dies closes its
FIFO ends (the kernel does that for a crashed process), so a read sees end of
file or a write sees a broken pipe: the channel is marked failed and every
transfer on it raises ``ConnectionError`` naming the peer (Python ignores
SIGPIPE, so a broken pipe is an error, not a signal; keep it that way). A
forked child (a data-loader worker) closes its inherited copies of the FIFOs,
so it does not hide its parent's death. A size mismatch fails the channel the
same way (``RuntimeError`` naming the peer and both sizes); other channels
carry on.

Set-up and clean-up (collectives/shm_channels.py). The constructor is
collective over the group and raises on every rank if it fails on any; it
leaves nothing in ``/dev/shm`` (the names are unlinked once mapped and
opened). ``close()`` releases descriptors and mappings. Shared memory used
per rank: its incoming channels, ``(local peers) * slots * slot_bytes`` bytes
(12 MiB with 4 local ranks and the defaults).
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import select
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .shm_channels import MAX_SLOTS, Channel, close_fds, open_channels
from .transport import PeerTimeoutError, TorchTransport, Waitable

DEFAULT_SLOT_BYTES = 1 << 20
DEFAULT_SLOTS = 4
_RING_NOW = 32 << 10  # pieces at least this large ring their doorbell at once (the peer starts copying)
_POLL_CAP_S = 60.0
DEFAULT_SPIN_US = 100  # only where the host has a core per local rank
_BELLS = b"\x01" * MAX_SLOTS


class _Done:
    """A transfer that needs no communication (zero bytes)."""

    __slots__ = ()

    def wait(self) -> None:
        pass


_DONE = _Done()


class _Op:
    """One transfer on a shared-memory channel; ``wait()`` runs the progress engine until it is done."""

    __slots__ = ("engine", "peer", "what", "buf", "nbytes", "off", "done", "error")

    def __init__(self, engine: ShmTransport, peer: int, what: str, buf: torch.Tensor, nbytes: int) -> None:
        self.engine, self.peer, self.what = engine, peer, what
        self.buf, self.nbytes, self.off = buf, nbytes, 0
        self.done = False
        self.error: BaseException | None = None

    def wait(self) -> None:
        if not self.done:
            self.engine._wait(self)


class _Fallback:
    """A gloo transfer of a transport that also has shared-memory channels: while shared-memory
    transfers are pending, waiting on it keeps them moving (a peer may need them to proceed)."""

    __slots__ = ("engine", "inner", "done")

    def __init__(self, engine: ShmTransport, inner: Waitable) -> None:
        self.engine, self.inner, self.done = engine, inner, False

    def wait(self) -> None:
        if self.done:
            return
        work = getattr(self.inner, "work", None)
        if work is not None:
            self.engine._progress_until(work.is_completed)
        self.inner.wait()
        self.done = True


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {text!r}") from None


def slot_bytes_setting() -> int:
    """The slot size a transport takes without an explicit one: $TOPOCOMM_SHM_SLOT_BYTES, else 1 MiB (the cost
    model reads it too: [Note: shared cores] in rounds.py)."""
    return _env_int("TOPOCOMM_SHM_SLOT_BYTES", DEFAULT_SLOT_BYTES)


class ShmTransport:
    """Shared memory with the peers marked in ``peers_local`` (None: every peer), gloo
    (a wrapped ``TorchTransport``) with the others. Collective: every rank of ``group``
    constructs it. ``slot_bytes``/``slots`` default to ``TOPOCOMM_SHM_SLOT_BYTES`` /
    ``TOPOCOMM_SHM_SLOTS`` or 1 MiB x 4 and must be the same on every rank."""

    def __init__(self, group: dist.ProcessGroup, peers_local: Sequence[bool] | None = None,
                 timeout: datetime.timedelta | None = None, slot_bytes: int | None = None,
                 slots: int | None = None) -> None:
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=timeout)
        self._fallback = TorchTransport(group, timeout)
        self.rank, self.size = self._fallback.rank, self._fallback.size
        self.backend = self._fallback.backend
        if self.backend != "gloo":
            raise ValueError(f"ShmTransport needs a gloo (CPU) process group, got backend {self.backend!r}")
        self.timeout = timeout
        self._timeout_s = None if timeout is None else timeout.total_seconds()
        slot_bytes = slot_bytes_setting() if slot_bytes is None else slot_bytes
        slots = _env_int("TOPOCOMM_SHM_SLOTS", DEFAULT_SLOTS) if slots is None else slots
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
            raise ValueError(f"slot_bytes: expected a positive int, got {slot_bytes!r}")
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots: expected an int in 1..{MAX_SLOTS}, got {slots!r}")
        self.slot_bytes, self.slots = slot_bytes, slots
        if peers_local is None:
            mask = [True] * self.size
        else:
            mask = [bool(x) for x in peers_local]
            if len(mask) != self.size:
                raise ValueError(f"peers_local: expected {self.size} entries (one per rank), got {len(mask)}")
        mask[self.rank] = False
        self._fds: list[int] = []
        self._release = weakref.finalize(self, close_fds, self._fds)
        # A forked child (a data-loader worker, say) must not keep our FIFO ends open: a peer would
        # then never see this rank's death. The child drops its copies; the parent is unaffected.
        os.register_at_fork(after_in_child=functools.partial(close_fds, self._fds))
        self._closed = False
        self._outs, self._ins = open_channels(group, self.rank, self.size, self._fallback.global_ranks[0], mask,
                                              slot_bytes, slots, self._fds)
        self._channels = [c for c in self._ins + self._outs if c is not None]
        self.local_peers = tuple(p for p in range(self.size) if self._outs[p] is not None)
        # Spinning before sleeping pays only where every local rank has a core of its own.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        spare = cores >= len(self.local_peers) + 1
        self.spin_us = _env_int("TOPOCOMM_SHM_SPIN_US", DEFAULT_SPIN_US if spare else 0)
        self._spin_s = max(0, self.spin_us) * 1e-6

    # -- the group ------------------------------------------------------------

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._fallback.group

    @group.setter
    def group(self, group: dist.ProcessGroup | None) -> None:
        self._fallback.group = group

    # -- set-up -----------------------------------------------------------------

    # -- posting ----------------------------------------------------------------

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recvs: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[Waitable], list[Waitable]]:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: this ShmTransport is closed")
        if not self._channels:
            return self._fallback.post(sends, recvs)
        out: list[list[Waitable | None]] = [[None] * len(sends), [None] * len(recvs)]
        remote: list[list[tuple[int, torch.Tensor]]] = [[], []]
        where: list[list[int]] = [[], []]
        local: list[tuple[int, int, Channel, torch.Tensor]] = []
        # Check everything before anything is queued: a bad item must not leave half a post behind.
        for side, items, chans, what in ((1, recvs, self._ins, "receive"), (0, sends, self._outs, "send")):
            for j, (p, t) in enumerate(items):
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.size or p == self.rank:
                    raise ValueError(f"rank {self.rank}: {what} peer must be another rank in 0..{self.size - 1}, "
                                     f"got {p!r}")
                ch = chans[p]
                if ch is None:
                    remote[side].append((p, t))
                    where[side].append(j)
                else:
                    local.append((side, j, ch, self._bytes(t, what, p)))
        if remote[0] or remote[1]:
            ws = self._fallback.post(remote[0], remote[1])
            for side in (0, 1):
                for j, w in zip(where[side], ws[side]):
                    out[side][j] = _Fallback(self, w)
        queued = False
        for side, j, ch, buf in local:
            if buf.numel() == 0:
                out[side][j] = _DONE
                continue
            op = _Op(self, ch.peer, "receive" if side else "send", buf, buf.numel())
            if ch.error is not None:
                op.error = ch.error
            else:
                ch.queue.append(op)
                queued = True
            out[side][j] = op
        if queued:
            self._progress()  # move what can move without blocking (small messages go out here)
        return out[0], out[1]  # type: ignore[return-value]

    def _bytes(self, t: torch.Tensor, what: str, peer: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rank {self.rank}: {what} with rank {peer}: expected a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"rank {self.rank}: {what} with rank {peer}: shared memory moves CPU tensors only, "
                             f"got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"rank {self.rank}: {what} with rank {peer}: the tensor must be contiguous")
        return t.detach().reshape(-1).view(torch.uint8)

    # -- the progress engine -----------------------------------------------------

    def _progress(self) -> bool:
        """Move every channel as far as it goes without blocking; True if anything moved."""
        moved = False
        for ch in self._channels:
            if ch.queue and self._move(ch):
                moved = True
        return moved

    def _refill(self, ch: Channel, owed: int, what: str) -> int:
        """Out of slots (a sender's credits, a receiver's data): ring the ``owed`` doorbells, then take
        what the peer has rung. 1: slots came; 0: none yet; -1: the channel failed or a doorbell could
        not be rung (the caller stops and reports progress)."""
        if owed and not self._ring(ch, owed):
            return -1
        try:
            got = os.read(ch.read_fd, MAX_SLOTS)
        except BlockingIOError:
            return 0
        if not got:
            self._fail(ch, self._closed_error(ch, f"reading {what}: end of file"))
            return -1
        ch.avail += len(got)
        return 1

    def _move(self, ch: Channel) -> bool:
        """Move ``ch``'s queue as far as its slots allow: a sender fills free slots and rings the data
        doorbell, a receiver empties full ones and returns credits. True if anything moved."""
        q, slots, hdr, size, out = ch.queue, ch.slots, ch.hdr, ch.slot_bytes, ch.out
        moved = False
        owed = 0  # doorbells not rung yet (batched below _RING_NOW bytes)
        while q:
            if not ch.avail:
                got = self._refill(ch, owed, "credits" if out else "data")
                owed = 0
                if got < 0:
                    return True
                if not got:
                    break
            op = q[0]
            i, off = ch.index, op.off
            if out:
                hdr[i] = op.nbytes
            elif off == 0 and not self._matches(ch, op, int(hdr[i])):
                return True
            n = min(op.nbytes - off, size)
            piece = op.buf if n == op.nbytes else op.buf[off:off + n]
            slot = slots[i] if n == size else slots[i][:n]
            if out:
                slot.copy_(piece)
            else:
                piece.copy_(slot)
            ch.index = i + 1 if i + 1 < ch.nslots else 0
            ch.avail -= 1
            op.off = off + n
            if op.off == op.nbytes:
                q.popleft()
                op.done = True
                op.buf = None
            moved = True
            owed += 1
            if n >= _RING_NOW:
                if not self._ring(ch, owed):
                    return True
                owed = 0
        if owed:
            self._ring(ch, owed)
        return moved

    def _matches(self, ch: Channel, op: _Op, sent: int) -> bool:
        """A receive's first piece: does the message's byte count match? If not, fail the channel."""
        ch.messages += 1
        if sent == op.nbytes:
            return True
        self._fail(ch, RuntimeError(
            f"rank {self.rank}: size mismatch with rank {ch.peer}: message #{ch.messages} from rank "
            f"{ch.peer} has {sent} bytes but the matching receive on rank {self.rank} expects "
            f"{op.nbytes} bytes (receives from a peer match its sends in posting order)"))
        return False

    def _ring(self, ch: Channel, k: int) -> bool:
        """Write ``k`` doorbell bytes (never blocks: a FIFO holds at most ``slots`` of them).
        False when the channel failed."""
        if ch.write_fd < 0:
            return True  # credits for a sender that has gone: nobody needs them
        try:
            os.write(ch.write_fd, _BELLS[:k])
            return True
        except BrokenPipeError as e:
            if not ch.out:
                # The sender closed its end: it finished (every message it sent is in the slots
                # already) or died. Either way what we hold is intact; a receive that needs more
                # finds the end of the data FIFO and fails there.
                ch.write_fd = -1
                return True
            self._fail(ch, self._closed_error(ch, f"writing data: {e}"))
        except OSError as e:
            self._fail(ch, ConnectionError(f"rank {self.rank}: shared-memory channel with rank {ch.peer} failed: {e}"))
        return False

    def _closed_error(self, ch: Channel, detail: str) -> ConnectionError:
        return ConnectionError(f"rank {self.rank}: rank {ch.peer} closed its shared-memory channel with rank "
                               f"{self.rank} ({detail}): rank {ch.peer} exited, died or closed its transport "
                               f"with transfers pending")

    def _fail(self, ch: Channel, err: BaseException) -> None:
        """Mark the channel failed: its pending transfers, and any posted later, raise ``err``."""
        if ch.error is None:
            ch.error = err
        for op in ch.queue:
            op.error = ch.error
            op.buf = None
        ch.queue.clear()

    def _block(self, timeout_s: float | None) -> None:
        """Sleep until a FIFO that a blocked channel needs is readable (or ``timeout_s`` passes)."""
        poller = select.poll()
        for ch in self._channels:
            if ch.queue and not ch.avail:
                poller.register(ch.read_fd, select.POLLIN)
        s = _POLL_CAP_S if timeout_s is None else min(timeout_s, _POLL_CAP_S)
        poller.poll(max(1, math.ceil(s * 1000)))

    def _wait(self, op: _Op) -> None:
        if self._closed and op.error is None:
            raise RuntimeError(f"rank {self.rank}: this ShmTransport is closed")
        timeout = self._timeout_s
        since = None
        spin = self._spin_s
        while True:
            if op.done:
                return
            if op.error is not None:
                raise op.error
            if self._progress():
                since = None
                spin = self._spin_s
                continue
            if spin:  # cores to spare: poll the FIFOs a little before sleeping (a wake-up costs more)
                end = time.perf_counter() + spin
                spin = 0.0
                while time.perf_counter() < end:
                    if self._progress():
                        since = None
                        spin = self._spin_s
                        break
                continue
            now = time.monotonic()
            if since is None:
                since = now
            elif timeout is not None and now - since >= timeout:
                raise PeerTimeoutError(self.rank, op.peer, op.what, TimeoutError(
                    f"no shared-memory progress for {now - since:.1f} s"))
            self._block(None if timeout is None else timeout - (now - since))

    def _progress_until(self, finished: Callable[[], bool]) -> None:
        """Keep shared-memory transfers moving until ``finished()`` (a gloo transfer; checked every
        millisecond), until none is left, or until nothing moved for the timeout."""
        timeout = self._timeout_s
        since = None
        while not self._closed and not finished() and any(ch.queue for ch in self._channels):
            if self._progress():
                since = None
                continue
            now = time.monotonic()
            since = now if since is None else since
            if timeout is not None and now - since >= timeout:
                return  # the gloo wait raises its own timeout
            self._block(0.001)

    # -- tear-down ----------------------------------------------------------------

    def close(self) -> None:
        """Release the descriptors and mappings; pending shared-memory transfers fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        err = RuntimeError(f"rank {self.rank}: this ShmTransport was closed with the transfer pending")
        for ch in self._channels:
            self._fail(ch, err)
            ch.slots, ch.hdr = [], None
        self._channels = []
        self._outs = [None] * self.size
        self._ins = [None] * self.size
        self._release()

    def __repr__(self) -> str:
        return (f"ShmTransport(rank={self.rank}, size={self.size}, local_peers={list(self.local_peers)}, "
                f"slot_bytes={self.slot_bytes}, slots={self.slots})")


# [Note: shared memory between local ranks]
# gloo moves every byte through the kernel's TCP loopback, even between processes of one host:
# on the 2-core reference machine a 16 MiB send took 16-20 ms with 4 ranks busy, against about
# 2 ms to copy it. So on gloo the executor's transport is ShmTransport, which moves bytes between
# ranks of one host and node through shared memory (and the rest through gloo); TOPOCOMM_SHM=0
# turns it off. "One node" is the topology's: ranks of emulated nodes on one host (separate
# network namespaces, torchrun agents) still talk through their network. Point-to-point calls
# (isend, irecv) stay on gloo: shared-memory transfers move only while their rank waits, and a
# caller may post a send and then block on something else (a barrier, another group) that the
# receiver only reaches after the send; gloo's threads move it anyway.
def shared_memory(comm, fallback: TorchTransport):
    """``comm``'s executor transport on gloo: shared memory between ranks of one host and node, gloo for
    the rest (``fallback`` itself where no two ranks share a host). Collective: every rank calls it."""
    import socket
    import warnings

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    hosts = [tuple(h) for h in comm.exchange_json([socket.gethostname(), boot])]
    node = {r: i for i, ranks in enumerate(comm.topology.nodes) for r in ranks}

    def together(a: int, b: int) -> bool:
        return hosts[a] == hosts[b] and a in node and b in node and node[a] == node[b]

    if not any(together(a, b) for a in range(comm.size) for b in range(a + 1, comm.size)):
        return fallback  # the same decision on every rank: hosts and nodes are everyone's
    try:
        return ShmTransport(comm.group, [together(comm.rank, p) for p in range(comm.size)], timeout=comm.timeout)
    except (OSError, ValueError, RuntimeError) as e:  # set-up failures are raised on every rank alike
        warnings.warn(f"topocomm: shared memory between local ranks is unavailable ({e}); "
                      f"collectives use gloo", RuntimeWarning, stacklevel=3)
        return fallback
