"""Run `rope-leak analyze` on several GPUs or nodes with torch.distributed (torchrun).

Each rank runs shard ``rank/world_size`` of the corpus (whole batches, global prompt
indices) on its own device and writes ``OUT/shard-<rank>/``; after a barrier, rank 0
merges the shards into ``OUT/`` (results.json, heads.csv, layers.csv, statistics.npz,
report.html), exactly as one `rope-leak analyze` over the whole corpus would.

    # one node, 4 GPUs
    torchrun --nproc_per_node=4 examples/torchrun_shards.py --prompts 256 --out runs/smollm2
    # 2 nodes x 8 GPUs (run on every node; OUT must be on a shared filesystem)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        examples/torchrun_shards.py --model smollm2-135m --prompts 1024 --out /shared/runs/x
    # CPU only (gloo), e.g. to try it out
    torchrun --nproc_per_node=2 examples/torchrun_shards.py --prompts 16 --out runs/cpu

Every argument of `rope-leak analyze` is accepted except --shard and --device (each rank
uses cuda:<local rank> when CUDA is available, else the CPU). A killed rank can be
restarted with the same command: shards resume from their checkpoints.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from rope_leak.cli import main


def _option(argv: list[str], name: str, default: str | None = None) -> str | None:
    for k, arg in enumerate(argv):
        if arg == name and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def run(argv: list[str]) -> int:
    if _option(argv, "--shard") or _option(argv, "--device"):
        raise SystemExit("pass neither --shard nor --device: each rank picks its own.")
    out = Path(_option(argv, "--out", "rope_leak_out"))
    rest, skip = [], False
    for arg in argv:  # drop --out; each rank writes its own shard folder
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            rest.append(arg)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    try:
        shard_dir = out / f"shard-{rank:04d}"
        code = main(["analyze", *rest, "--shard", f"{rank}/{world}", "--device", device,
                     "--out", str(shard_dir), *(["--overwrite"] if "--overwrite" in rest else [])])
        codes = [None] * world
        dist.all_gather_object(codes, code)  # also the barrier: every shard is written
        if rank == 0:
            if any(codes):
                print(f"rope-leak: shards failed on ranks {[r for r, c in enumerate(codes) if c]}",
                      file=sys.stderr)
                return 1
            merge = ["merge", *(str(out / f"shard-{r:04d}") for r in range(world)), "--out", str(out)]
            return main(merge + (["--overwrite"] if "--overwrite" in rest else []))
        return max(codes)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
