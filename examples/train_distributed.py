"""Your own training loop on N processes: DDP or FSDP2, adapter saved once, loadable anywhere.

    torchrun --nproc-per-node 2 examples/train_distributed.py                 # DDP, gloo on CPU
    torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp2         # FSDP2 per layer + root
    torchrun --nproc-per-node 2 examples/train_distributed.py --method rasa --out out/rasa

(nccl and cuda:LOCAL_RANK are used when GPUs are present.) For a Trainer-based job with
checkpoints, resume and a report, use ``peftcompile train`` instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import peftcompile as pc
from peftcompile.distributed import shard
from peftcompile.models import tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "gralora", "rasa"], default="gralora")
    ap.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 instead of DDP")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("out/distributed"))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same base (and adapter init) on every rank
    model = tiny_llama()
    method = {"lora": pc.LoRA(r=8, alpha=16), "gralora": pc.GraLoRA(r=8, k=2, alpha=16),
              "rasa": pc.RaSA(r=8, k=1, alpha=16)}[args.method]
    pc.adapt(model, pc.AdapterSpec(method, targets="all-linear"))  # adapt BEFORE wrapping / sharding
    if args.fsdp2:
        runner = shard(model, device)  # fully_shard per decoder layer, then the root
    else:
        model.to(device)
        runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(1)  # the same global batches everywhere; each rank takes its slice
    for step in range(args.steps):
        ids = torch.randint(3, model.config.vocab_size, (4 * world, 32), generator=g).chunk(world)[rank].to(device)
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step:3d}  loss {mean.item() / world:.4f}")

    pc.save_adapters(runner, args.out)  # every rank: shards are gathered, rank 0 writes
    if rank == 0:
        print(f"adapter written to {args.out}; load it in one process with pc.load_adapters(model, dir)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
