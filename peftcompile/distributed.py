"""Adapters on wrapped and sharded models: DDP, FSDP1, FSDP2 (``fully_shard``), ``torch.compile``.

Adapter state lives on the model itself, so a wrapper is unwrapped first (``DDP.module``,
FSDP1's ``.module``, ``OptimizedModule._orig_mod``, several layers deep). Saving is one
API for 1 and N processes:

* every rank calls ``save_adapters``: the ranks meet (a rendezvous with a timeout that
  names the ranks that did not come), check that they hold the same adapter (same keys and
  shapes; replicated tensors bit-identical), gather FSDP2 ``DTensor`` shards to full CPU
  tensors, and **rank 0** writes the files (atomically); every rank then learns whether
  the write worked, so all raise or none does.
* every rank calls ``load_adapters``: each reads the full tensors from the file and keeps
  its own shard (``distribute_tensor(..., src_data_rank=None)``: no communication), so a
  checkpoint written with any world size loads into any other.

Only adapter tensors (and a spec's ``trainable`` modules) are gathered; the frozen base
is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import AdapterError

__all__ = [
    "RENDEZVOUS_TIMEOUT_S",
    "copy_into_",
    "is_distributed",
    "is_sharded",
    "rank",
    "require_unsharded",
    "reshard_",
    "shard",
    "unwrap",
    "unwrapped",
    "world_size",
    "write_checkpoint",
]

#: How long save_adapters waits for every rank to arrive before naming the missing ones.
RENDEZVOUS_TIMEOUT_S = float(os.environ.get("PEFTCOMPILE_RENDEZVOUS_TIMEOUT", "60"))

_SEQ: dict[str, itertools.count] = defaultdict(itertools.count)


def _wrapped_child(m: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, or None if ``m`` is not a known wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(m, DistributedDataParallel):
        return m.module
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = ()
    if FSDP1 and isinstance(m, FSDP1):
        return m.module
    orig = m.__dict__.get("_modules", {}).get("_orig_mod")  # torch.compile's OptimizedModule
    if orig is not None and type(m).__name__ == "OptimizedModule":
        return orig
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / FSDP1 / torch.compile wrappers (the object ``adapt`` was called on).

    FSDP2 (``fully_shard``) is not a wrapper: it changes the class in place, so the model
    is returned as is.
    """
    seen = 0
    while (inner := _wrapped_child(model)) is not None and seen < 16:
        model, seen = inner, seen + 1
    return model


def _fsdp1_wrapper(model: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        return None
    m = model
    while m is not None:
        if isinstance(m, FSDP1):
            return m
        m = _wrapped_child(m)
    return None


def reshard_(model: nn.Module) -> nn.Module:
    """Put every FSDP2 module back on its sharded parameters (local, no communication).

    An FSDP2 root is not resharded after a forward without backward (e.g. an eval step), so its
    module attributes then hold unsharded plain tensors; reading or loading adapters there
    would see (or write into) throw-away copies.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return model
    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


@contextlib.contextmanager
def unwrapped(model: nn.Module, *, writeback: bool) -> Iterator[nn.Module]:
    """Yield the unwrapped model (FSDP2: on its sharded parameters); under FSDP1, inside
    ``summon_full_params`` (full tensors on every rank, written back to the shards if ``writeback``)."""
    fsdp1 = _fsdp1_wrapper(model)
    if fsdp1 is None:
        yield reshard_(unwrap(model))
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    with FSDP1.summon_full_params(fsdp1, writeback=writeback, with_grads=False):
        yield unwrap(model)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP1 wrapper or if any parameter is a DTensor (FSDP2 / tensor parallel)."""
    return _fsdp1_wrapper(model) is not None or any(_is_dtensor(p) for p in unwrap(model).parameters())


def _require_group(tensors, what: str) -> None:
    """DTensors need their process group: a clear error instead of a crash deep in a collective."""
    if any(_is_dtensor(t) for t in tensors) and not (dist.is_available() and dist.is_initialized()):
        raise AdapterError(
            f"{what}: the model holds DTensor shards (FSDP2) but no process group is initialised (it was never "
            f"set up, or destroy_process_group ran). Call it while torch.distributed is initialised, on every "
            f"rank. Nothing was written or changed."
        )


def require_unsharded(model: nn.Module, what: str) -> None:
    """AdapterError if ``model`` is FSDP2-sharded (``what`` cannot run on shards)."""
    if is_sharded(model):
        raise AdapterError(
            f"{what} cannot run on an FSDP-sharded model (its parameters are shards). Fix: "
            f"save_adapters(model, dir) on every rank, then on one process load_adapters(base_model, dir) "
            f"into an unsharded copy of the base and call {what} there"
        )


# ---------------------------------------------------------------- rendezvous and checks
def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a custom backend): fall back to a barrier
        return None


def _rendezvous(op: str, timeout_s: float) -> None:
    """Every rank reaches this point within ``timeout_s``, else AdapterError naming the missing ranks.

    Uses the process group's key-value store, so it works on gloo and nccl and a rank that
    never calls ``op`` cannot hang the others in a collective.
    """
    store = _store()
    if store is None:
        dist.barrier()
        return
    seq = next(_SEQ[op])
    keys = [f"peftcompile/{op}/{seq}/{r}" for r in range(dist.get_world_size())]
    store.set(keys[dist.get_rank()], "1")
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - DistStoreError / RuntimeError depending on the store
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise AdapterError(
            f"{op}: rank {dist.get_rank()} waited {timeout_s:.0f}s but rank(s) {missing} never called {op}. "
            f"Call {op} on every rank (not under `if rank == 0:`): all ranks take part in gathering, and "
            f"rank 0 writes the files. Nothing was written."
        ) from None


def _signature(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """key -> (global shape, dtype, digest of the values or the sharding) of one rank's adapter."""
    sig = {}
    for k, t in tensors.items():
        if _is_dtensor(t):
            digest = f"dtensor:{tuple(t.placements)}"
        else:
            digest = hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        sig[k] = (tuple(t.shape), str(t.dtype), digest)
    return sig


def _site_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _check_same_on_all_ranks(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """AdapterError (raised identically on every rank) if the ranks' adapters differ."""
    mine = _signature(tensors)
    sigs: list = [None] * dist.get_world_size()
    dist.all_gather_object(sigs, mine)
    ref = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        only0, onlyr = sorted(set(ref) - set(sig)), sorted(set(sig) - set(ref))
        if only0 or onlyr:
            k = (only0 or onlyr)[0]
            raise AdapterError(
                f"{what}: ranks hold different adapters: {k!r} (site {_site_of(k)!r}) is only on rank "
                f"{0 if only0 else r} (rank 0 has {len(ref)} tensors, rank {r} has {len(sig)}). Adapt every "
                f"rank's model with the same spec. Nothing was written."
            )
        for k in ref:
            if ref[k][:2] != sig[k][:2]:
                raise AdapterError(
                    f"{what}: site {_site_of(k)!r}: tensor {k!r} is {ref[k][:2]} on rank 0 but {sig[k][:2]} on rank "
                    f"{r}. Adapt every rank's model with the same spec. Nothing was written."
                )
            if ref[k][2] != sig[k][2]:
                raise AdapterError(
                    f"{what}: site {_site_of(k)!r}: tensor {k!r} has different values on rank 0 and rank {r} "
                    f"(replicas diverged: a rank trained or loaded alone). Load the same adapter on every rank, "
                    f"or wrap the model in DDP/FSDP so gradients are synchronised. Nothing was written."
                )


def _gather(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU tensors (DTensors all-gathered; every rank calls this in the same key order)."""
    out = {}
    for k in sorted(tensors):
        t = tensors[k].detach()
        if _is_dtensor(t):
            t = t.full_tensor()
        out[k] = t.cpu().contiguous()
    return out


# ---------------------------------------------------------------- writing
Writer = Callable[[Path, dict, dict], None]


def write_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], config: dict, writer: Writer) -> Path:
    """Write one adapter checkpoint, once, from 1 or N processes.

    ``writer(path, full_cpu_tensors, config)`` does the (atomic) file work. One process:
    gather nothing, write. N processes (every rank must call): rendezvous, check the ranks
    agree, gather shards, rank 0 writes, all ranks learn the outcome.
    """
    path = Path(path)
    _require_group(tensors.values(), "save_adapters")
    if not is_distributed():
        writer(path, _gather(tensors), config)
        return path
    what = "save_adapters"
    _rendezvous(what, RENDEZVOUS_TIMEOUT_S)
    _check_same_on_all_ranks(tensors, what)
    full = _gather(tensors)  # collective for DTensors: every rank, same order
    err = None
    if dist.get_rank() == 0:
        try:
            writer(path, full, config)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            err = f"{type(e).__name__}: {e}"
    status = [err]
    dist.broadcast_object_list(status, src=0)  # also the barrier: files exist once this returns
    if status[0] is not None:
        raise AdapterError(f"save_adapters: rank 0 (the writing rank) failed to write {path}: {status[0]}")
    return path


# ---------------------------------------------------------------- loading onto shards
def copy_into_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` where ``param`` may be a DTensor shard: keep this rank's slice.

    No communication (each rank read the full tensor from the file), so it works for any
    world size the checkpoint was written with.
    """
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        _require_group([param], "load_adapters")

        local = distribute_tensor(full.to(device=param.device, dtype=param.dtype), param.device_mesh,
                                  param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


# ---------------------------------------------------------------- FSDP2 set-up
def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: HF ``_no_split_modules`` classes, else ModuleList items."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [c for m in model.modules() if isinstance(m, nn.ModuleList) for c in m]
    return blocks


def shard(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """FSDP2 for an adapted model: ``fully_shard`` per decoder layer, then the root.

    Each layer's base weights and adapters are sharded together (frozen weights get no
    gradient and are never reduced); the root holds embeddings, head and RaSA's shared
    tensors, whose gradient sums the contributions of every layer before one reduce-scatter.
    Call after ``adapt`` / ``load_adapters`` (adding an adapter to shards is refused) and
    after ``torch.distributed`` is initialised; the device is cuda:LOCAL_RANK on GPU, else CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise AdapterError("shard: torch.distributed is not initialised; launch with torchrun and call "
                               "torch.distributed.init_process_group first")
    if is_sharded(model):
        raise AdapterError("shard: the model is already sharded")
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
