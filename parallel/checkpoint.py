"""Sharded checkpoints of ZeRO models: one file per rank plus JSON metadata; reload at any world size.

    P.save_checkpoint("ckpt", model, opt)      # collective
    P.load_checkpoint("ckpt", model, opt)      # collective; another world size, stage or unit layout is fine

Layout of ``directory``::

    latest                 the name of the current checkpoint (replaced atomically)
    ckpt-000007/
        metadata.json      world size, every unit's flat layout, optimizer hyper-parameters
        rank-00000.pt ...  torch.save of a flat dict of tensors, loaded with weights_only=True

A rank file holds, for every unit, the real (unpadded) part of that rank's
master shard (``param.<unit>``) and of each element-wise optimizer state
(``optim.<unit>.<key>``, e.g. exp_avg); rank 0's file also holds the per-unit
scalar state (``scalar.<unit>.<key>``, e.g. step) and the buffers
(``buffer.<name>``).

[Note: atomic save] Ranks write into a fresh ``.tmp-*`` directory and fsync
their file; then they agree (every rank learns of any rank's failure, so none
hangs and all raise); rank 0 writes the metadata, fsyncs, renames the
directory to ``ckpt-N``, fsyncs ``directory``, and only then points ``latest``
at it (write a temporary file, fsync, ``os.replace``). A crash at any moment
leaves ``latest`` naming the last complete checkpoint; leftovers of a failed
save are removed by the next one.

[Note: resharding] A checkpoint is addressed by parameter name and element:
the metadata's layouts map each saved flat range to (name, elements), and each
rank of the loading job fills its own shard by reading, from whichever old
rank files hold them, exactly the elements it needs (files are memory-mapped).
So world size, stage and unit boundaries may all differ between save and load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from .zero._flat import FlatLayout
from .zero._model import ZeroState, zero_state

FORMAT = "topocomm.zero-checkpoint"
VERSION = 1
_PREFIX = "ckpt-"
_LATEST = "latest"


# -- file system helpers (the fault-injection tests patch _write_file and _publish) -------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        if isinstance(obj, (bytes, str)):
            f.write(obj.encode() if isinstance(obj, str) else obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _publish(directory: Path, tmp: Path, name: str) -> None:
    """Make ``tmp`` the checkpoint ``name`` and point ``latest`` at it (rank 0)."""
    _fsync_dir(tmp)
    os.rename(tmp, directory / name)
    _fsync_dir(directory)
    pointer = directory / f".{_LATEST}.{uuid.uuid4().hex}"
    _write_file(pointer, name + "\n")
    os.replace(pointer, directory / _LATEST)
    _fsync_dir(directory)


def _current(directory: Path) -> str | None:
    try:
        return (directory / _LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def _number(name: str) -> int | None:
    rest = name[len(_PREFIX):]
    return int(rest) if name.startswith(_PREFIX) and rest.isdigit() else None


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _remove_leftovers(directory: Path, current: str | None) -> None:
    """Remove what failed saves left: temporary entries, and checkpoints newer than ``latest`` (never published)."""
    cur = (_number(current) or 0) if current else 0
    for entry in directory.iterdir():
        n = _number(entry.name)
        if entry.name.startswith((".tmp-", f".{_LATEST}.")) or (n is not None and n > cur):
            _remove(entry)


def _prune(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (the current one is the newest)."""
    done = sorted((n, e) for e in directory.iterdir() if (n := _number(e.name)) is not None)
    for _, entry in done[:-max(1, keep)]:
        _remove(entry)


def _agree(z: ZeroState, error: str | None, what: str) -> None:
    """Every rank raises if any rank failed (a collective; no rank is left waiting)."""
    errors = z.comm.exchange_json(error)
    failed = {r: e for r, e in enumerate(errors) if e}
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
        raise RuntimeError(f"{what} failed ({detail})")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# -- save ------------------------------------------------------------------------------------------

def _optimizer_state(opt: torch.optim.Optimizer | None, z: ZeroState) -> list[dict]:
    if opt is None:
        return [{} for _ in z.units]
    if getattr(opt, "_zero", None) is None or opt._zero.units is not z.units:
        raise ValueError("opt: expected the optimizer zero() returned together with this model")
    return [opt.state.get(u.master, {}) for u in z.units]


def _rank_tensors(z: ZeroState, states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's file contents, and what the metadata says about the optimizer state."""
    rank = z.comm.rank
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, dict] = {}
    for u, st in zip(z.units, states):
        lo, hi = u.layout.bounds(rank)
        valid = hi - lo
        tensors[f"param.{u.index}"] = u.master[:valid].detach().to("cpu", copy=True)
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == u.master.numel():
                tensors[f"optim.{u.index}.{key}"] = v[:valid].detach().to("cpu", copy=True)
                kinds[key] = {"kind": "elementwise", "dtype": str(v.dtype).removeprefix("torch.")}
            elif isinstance(v, torch.Tensor):
                if rank == 0:
                    tensors[f"scalar.{u.index}.{key}"] = v.detach().to("cpu", copy=True)
                kinds[key] = {"kind": "tensor"}
            else:
                kinds[key] = {"kind": "value", "values": {}}
    if rank == 0:
        for name, b in z.module.named_buffers():
            tensors[f"buffer.{name}"] = b.detach().to("cpu", copy=True)
    return tensors, kinds


def _jsonable(v: object) -> object:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def _metadata(z: ZeroState, opt: torch.optim.Optimizer | None, kinds: dict, states: list[dict]) -> dict:
    for key, k in kinds.items():
        if k["kind"] == "value":
            k["values"] = {str(u.index): _jsonable(st[key]) for u, st in zip(z.units, states) if key in st}
    groups = [] if opt is None else [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {
        "format": FORMAT, "version": VERSION, "world_size": z.comm.size, "stage": z.stage,
        "master_dtype": str(z.precision.master).removeprefix("torch."),
        "units": [u.layout.to_json() for u in z.units],
        "buffers": [name for name, _ in z.module.named_buffers()],
        "optimizer": None if opt is None else {"class": type(opt).__name__, "param_groups": groups, "state": kinds},
        "files": [f"rank-{r:05d}.pt" for r in range(z.comm.size)],
    }


def save_checkpoint(directory: str | os.PathLike, model: object, opt: torch.optim.Optimizer | None = None,
                    keep: int = 1) -> Path:
    """Write a sharded checkpoint of ``model`` (and ``opt``) under ``directory`` (collective).

    Returns the new checkpoint's directory. ``keep`` complete checkpoints are
    kept (the newest). ``directory`` must be on a file system every rank sees.
    """
    z = zero_state(model)
    comm = z.comm
    directory = Path(directory)
    states = _optimizer_state(opt, z)
    info, error = None, None
    if comm.rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            cur = _current(directory)
            _remove_leftovers(directory, cur)
            numbers = [n for e in directory.iterdir() if (n := _number(e.name)) is not None]
            name = f"{_PREFIX}{max(numbers, default=0) + 1:06d}"
            tmp = directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            info = {"name": name, "tmp": tmp.name, "previous": cur}
        except OSError as e:
            error = _error(e)
    _agree(z, error, f"save_checkpoint({str(directory)!r}): preparing the directory")
    info = comm.exchange_json(info)[0]
    tmp = directory / info["tmp"]

    error = None
    try:
        tensors, kinds = _rank_tensors(z, states)
        _write_file(tmp / f"rank-{comm.rank:05d}.pt", tensors)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it
        error, kinds = _error(e), {}
    try:
        _agree(z, error, f"save_checkpoint({str(directory)!r}): writing shards")
    except RuntimeError as e:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{e}; the previous checkpoint ({info['previous']}) is intact") from None

    error = None
    if comm.rank == 0:
        try:
            meta = _metadata(z, opt, kinds, states)
            _write_file(tmp / "metadata.json", json.dumps(meta, indent=1, sort_keys=True))
            _publish(directory, tmp, info["name"])
            _prune(directory, keep)
        except Exception as e:  # noqa: BLE001
            error = _error(e)
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        _agree(z, error, f"save_checkpoint({str(directory)!r}): publishing")
    except RuntimeError as e:
        raise RuntimeError(f"{e}; the previous checkpoint ({info['previous']}) is intact") from None
    return directory / info["name"]


# -- load ------------------------------------------------------------------------------------------

def _resolve(directory: Path) -> Path:
    if (directory / "metadata.json").exists():
        return directory
    cur = _current(directory)
    if cur is None:
        raise FileNotFoundError(f"directory: no checkpoint in {str(directory)!r} (no {_LATEST} file, no metadata.json)")
    return directory / cur


class _OldShards:
    """The saved checkpoint's shards, read lazily (memory-mapped) by (old rank, key)."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.files = path, meta["files"]
        self.layouts = [FlatLayout.from_json(u) for u in meta["units"]]
        self.where = {s.name: (i, s) for i, lay in enumerate(self.layouts) for s in lay.slots}
        self._open: dict[int, dict[str, torch.Tensor]] = {}

    def file(self, rank: int) -> dict[str, torch.Tensor]:
        if rank not in self._open:
            self._open[rank] = torch.load(self.path / self.files[rank], map_location="cpu", weights_only=True, mmap=True)
        return self._open[rank]

    def fill(self, dst: torch.Tensor, layout: FlatLayout, lo: int, hi: int, key: str) -> None:
        """``dst[:hi - lo]`` = flat range [lo, hi) of ``layout``, from the saved tensors ``<key>.<old unit>``."""
        prefix, _, suffix = key.partition("{}")
        for piece in layout.pieces(lo, hi):
            old_unit, slot = self.where[piece.name]
            old = self.layouts[old_unit]
            a, b = slot.offset + piece.start, slot.offset + piece.end  # the piece in the old unit's flat range
            for r in range(a // old.shard, (b - 1) // old.shard + 1):
                rs, re_ = old.bounds(r)
                s, e = max(a, rs), min(b, re_)
                src = self.file(r)[f"{prefix}{old_unit}{suffix}"][s - rs:e - rs]
                at = piece.flat_start - lo + (s - a)
                dst[at:at + e - s].copy_(src)

    def scalar_unit(self, layout: FlatLayout) -> int:
        """The old unit whose scalar state (e.g. step) a new unit takes: that of its first parameter."""
        return self.where[layout.slots[0].name][0]


def _check_compatible(z: ZeroState, meta: dict, shards: _OldShards) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"directory: not a ZeRO checkpoint (format {meta.get('format')!r})")
    saved = {s.name: s.shape for lay in shards.layouts for s in lay.slots}
    mine = {s.name: s.shape for u in z.units for s in u.layout.slots}
    if saved != mine:
        missing, extra = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
        shapes = sorted(k for k in mine.keys() & saved.keys() if mine[k] != saved[k])
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"different shapes {[(k, saved[k], mine[k]) for k in shapes[:5]]}")


def _restored(current: object, saved: object) -> object:
    """A hyper-parameter from JSON, in the type the optimizer holds it in."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(current, torch.Tensor) and isinstance(saved, (int, float)):
        return torch.tensor(saved, dtype=current.dtype, device=current.device)
    if isinstance(current, float) and isinstance(saved, int) and not isinstance(saved, bool):
        return float(saved)
    return saved


# How the loading job runs its optimizer is its own choice, not the checkpoint's.
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _restore_hyperparameters(opt: torch.optim.Optimizer, groups: list[dict]) -> None:
    for group, saved in zip(opt.param_groups, groups):
        for k, v in saved.items():
            if k in _IMPLEMENTATION_FLAGS or (isinstance(v, str) and not isinstance(group.get(k), str)):
                continue  # (a string where the optimizer holds no string: the repr of a value JSON could not hold)
            group[k] = _restored(group.get(k), v)


def _place_scalar(key: str, v: torch.Tensor, master: torch.Tensor, group: dict) -> torch.Tensor:
    """As torch's Optimizer.load_state_dict places it: ``step`` float32 on CPU unless the optimizer is
    capturable or fused; other tensors on the parameter's device."""
    if key == "step":
        on_device = bool(group.get("capturable") or group.get("fused"))
        return v.to(dtype=torch.float32, device=master.device if on_device else "cpu")
    return v.to(master.device)


@torch.no_grad()
def load_checkpoint(directory: str | os.PathLike, model: object, opt: torch.optim.Optimizer | None = None) -> Path:
    """Load the current checkpoint in ``directory`` into ``model`` (and ``opt``) (collective).

    The job may have another world size, stage, mixed-precision setting or
    bucket size than the one that saved. Returns the checkpoint's directory.
    """
    z = zero_state(model)
    path = _resolve(Path(directory))
    meta = json.loads((path / "metadata.json").read_text())
    shards = _OldShards(path, meta)
    _check_compatible(z, meta, shards)
    _optimizer_state(opt, z)  # checks opt
    rank = z.comm.rank
    for u in z.units:
        lo, hi = u.layout.bounds(rank)
        u.master.zero_()
        shards.fill(u.master, u.layout, lo, hi, "param.{}")
    if opt is not None and meta.get("optimizer"):
        _load_optimizer(z, opt, meta["optimizer"], shards, rank)
    for name, b in z.module.named_buffers():
        if name in meta["buffers"]:
            b.copy_(shards.file(0)[f"buffer.{name}"])
    z.params.reload()
    z.grads.zero_grad()
    z.comm.barrier()
    return path


def _load_optimizer(z: ZeroState, opt: torch.optim.Optimizer, meta: dict, shards: _OldShards, rank: int) -> None:
    _restore_hyperparameters(opt, meta["param_groups"])
    for u in z.units:
        lo, hi = u.layout.bounds(rank)
        old_unit = shards.scalar_unit(u.layout)
        st = {}
        for key, k in meta["state"].items():
            if k["kind"] == "elementwise":
                t = torch.zeros(u.master.numel(), dtype=getattr(torch, k["dtype"]), device=u.master.device)
                shards.fill(t, u.layout, lo, hi, f"optim.{{}}.{key}")
                st[key] = t
            elif k["kind"] == "tensor":
                v = shards.file(0)[f"scalar.{old_unit}.{key}"].clone()
                st[key] = _place_scalar(key, v, u.master, opt.param_groups[0])
            elif str(old_unit) in k["values"]:
                st[key] = k["values"][str(old_unit)]
        opt.state[u.master] = st
