"""One rank of the 2-process gloo checks in test_distributed.py (spawned by the test, not collected).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py OUT REF

For LoRA, GraLoRA and RaSA: train under DDP and under FSDP2 (``fully_shard`` per decoder
layer + root) on halves of the same global batches as the single-process reference
(``train_reference``), record the global losses, save the adapter (every rank calls, rank 0
writes), load the single-process checkpoint REF/<method> onto the shards and save it back;
then the bad inputs. Each rank writes OUT/rank<r>.json with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import peftcompile as pc
from peftcompile import distributed as pcd
from peftcompile.models import TINY_VOCAB, tiny_llama

METHODS = {"lora": pc.LoRA(r=4, alpha=8), "gralora": pc.GraLoRA(r=4, k=2, alpha=8),
           "rasa": pc.RaSA(r=4, k=1, alpha=8)}
TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS, GLOBAL_BATCH, SEQ = 3, 4, 8
COMPILED = ("ddp", "fsdp2")  # compiled runs (GraLoRA: the fused op with the most structure)


def build(method: str, targets=TARGETS) -> torch.nn.Module:
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(METHODS[method], targets=targets))
    return m.train()


def batches() -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def probe_ids() -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))


def train(model: torch.nn.Module, runner, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps on this rank's slice of each global batch; returns the global mean losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for x in batches():
        xb = x.chunk(world)[rank]
        loss = runner(input_ids=xb, labels=xb).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        g = loss.detach().clone()
        if world > 1:
            dist.all_reduce(g)
            g /= world
        losses.append(g.item())
    return losses


def train_reference(method: str, out: Path) -> dict:
    """Single process, whole global batches: the yardstick."""
    m = build(method)
    losses = train(m, m)
    pc.save_adapters(m, out / method)
    with torch.no_grad():
        logits = m.eval()(input_ids=probe_ids()).logits
    return {"losses": losses, "logits": logits}


def build_switch() -> torch.nn.Module:
    """Two LoRA adapters that each train their own copy of the final norm (``trainable``)."""
    torch.manual_seed(0)
    m = tiny_llama()
    for name in ("a", "b"):
        pc.adapt(m, pc.AdapterSpec(METHODS["lora"], targets=["q_proj"], trainable=["model.norm"]), name)
    return m.train()


def switch_sequence(m: torch.nn.Module, runner, rank: int = 0, world: int = 1) -> dict:
    """Train a, switch to b (whose norm copy is still the original), train b, back to a; the
    losses and the probe logits of a, b and the base (each rank sees the same probe)."""
    pc.set_active(m, "a")
    la = train(m, runner, rank, world)
    pc.set_active(m, "b")
    lb = train(m, runner, rank, world)
    out = {"losses_a": la, "losses_b": lb}
    m.eval()
    with torch.no_grad():
        for name in ("a", "b"):
            pc.set_active(m, name)
            out[f"probe_{name}"] = m(input_ids=probe_ids()).logits.tolist()
        with pc.disabled(m):
            out["probe_base"] = m(input_ids=probe_ids()).logits.tolist()
    m.train()
    return out


def shard(model: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # root: embeddings, norm, head and RaSA's shared tensors


def expect_error(fn, *parts: str) -> str:
    try:
        fn()
    except pc.AdapterError as e:
        msg = str(e)
        missing = [p for p in parts if p not in msg]
        return "OK" if not missing else f"message lacks {missing}: {msg}"
    return "no error raised"


def compiled_runs(out: Path, rank: int, world: int) -> dict:
    """torch.compile(backend="peftcompile") inside DDP (small buckets, so dynamo splits the graph at
    DDP's bucket boundaries) and around an FSDP2 model; GraLoRA on the tiny Llama."""
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    res = {}
    for mode in COMPILED:
        torch._dynamo.reset()
        counters.clear()
        m = build("gralora")
        if mode == "ddp":
            # The tiny adapter (~6 KB) needs ~2 KB buckets to be split; DDPOptimizer requires the first
            # bucket (1 MB by default) to be no larger than the others, so lower that default here.
            dist._DEFAULT_FIRST_BUCKET_BYTES = 1024
            runner = torch.compile(DDP(m, bucket_cap_mb=0.002), backend="peftcompile")
        else:
            shard(m, world)
            runner = torch.compile(m, backend="peftcompile")
        losses = train(m, runner, rank, world)
        pc.save_adapters(m, out / f"compiled-{mode}-gralora")
        res[f"compiled-{mode}"] = {"losses": losses, "counters": dict(counters["peftcompile"])}
    return res


def main() -> None:
    out, ref = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sys.argv[3:] == ["compile"]:  # opt-in: minutes of CPU compile time
        res = compiled_runs(out, rank, world)
        (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
        return
    res: dict = {}
    for method in METHODS:
        # DDP: count what the reducer all-reduces (must be the trainable adapter params only)
        m = build(method)
        ddp = DDP(m)
        reduced = []

        def hook(state, bucket, reduced=reduced):
            reduced.append(sum(p.numel() for p in bucket.parameters()))
            fut = dist.all_reduce(bucket.buffer() / world, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
        losses = train(m, ddp, rank, world)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        pc.save_adapters(ddp, out / f"ddp-{method}")
        res[f"ddp-{method}"] = {"losses": losses, "reduced_per_step": sum(reduced) / STEPS, "trainable": trainable,
                                "summary_params": pc.summary(ddp).adapter_params}

        # FSDP2
        m = build(method)
        shard(m, world)
        losses = train(m, m, rank, world)
        frozen_grads = sum(1 for p in m.parameters() if not p.requires_grad and p.grad is not None)
        pc.save_adapters(m, out / f"fsdp2-{method}")
        res[f"fsdp2-{method}"] = {"losses": losses, "frozen_with_grad": frozen_grads}

        # load a single-process checkpoint onto shards, run, save back
        m = build(method)
        shard(m, world)
        m(input_ids=probe_ids())  # forward with grad, no backward: the FSDP2 root stays unsharded; load must land
        pc.load_adapters(m, ref / method)
        m(input_ids=probe_ids(), labels=probe_ids()).loss.backward()  # reshards the root: the load must be in the shards
        with torch.no_grad():
            logits = m.eval()(input_ids=probe_ids()).logits
        if rank == 0:
            torch.save(logits, out / f"fsdp2-load-{method}.pt")
        pc.save_adapters(m, out / f"fsdp2-resave-{method}")
        dist.barrier()

    # ---- switching adapters that train a module (per-adapter copies) on FSDP2 shards
    m = build_switch()
    shard(m, world)
    res["fsdp2-switch"] = switch_sequence(m, m, rank, world)

    # ---- bad inputs
    pcd.RENDEZVOUS_TIMEOUT_S = 3.0
    m = build("lora")
    shard(m, world)
    bad = out / "only-rank1"
    if rank == 1:
        res["save_one_rank"] = expect_error(lambda: pc.save_adapters(m, bad), "rank(s) [0]", "every rank",
                                            "rank 0 writes")
    dist.barrier()
    pcd._SEQ.clear()  # both ranks restart their rendezvous count after the deliberate skip
    res["save_one_rank_wrote"] = bad.exists()

    mis = build("lora", TARGETS if rank == 0 else ["q_proj", "v_proj"])
    res["mismatch"] = expect_error(lambda: pc.save_adapters(mis, out / "mismatch"), "mlp.down_proj",
                                   "only on rank 0")
    res["mismatch_wrote"] = (out / "mismatch").exists()
    div = build("lora")
    with torch.no_grad():
        next(p for p in div.parameters() if p.requires_grad).add_(rank)
    res["diverged"] = expect_error(lambda: pc.save_adapters(div, out / "diverged"), "different values",
                                   "rank 0 and rank 1")
    res["diverged_wrote"] = (out / "diverged").exists()
    res["merge_sharded"] = expect_error(lambda: pc.merge_and_unload(m), "FSDP-sharded", "save_adapters")
    torch.manual_seed(0)
    bare = tiny_llama()
    shard(bare, world)
    res["load_new_onto_shards"] = expect_error(lambda: pc.load_adapters(bare, ref / "lora"), "adapt before fully_shard")
    dist.barrier()
    dist.destroy_process_group()
    res["no_group"] = expect_error(lambda: pc.save_adapters(m, out / "no-group"), "no process group")
    res["no_group_wrote"] = (out / "no-group").exists()
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"rank {os.environ.get('RANK')} done in {time.time() - t0:.1f}s")
