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
uses cuda:<local rank> when CUDA is available, else the CPU); they are parsed by the
command line's parser and passed to `rope_leak.run` (each rank's shard) and
`rope_leak.merge` (rank 0). A killed rank can be restarted with the same command: shards
resume from their checkpoints.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import rope_leak as rl
from rope_leak.cli import build_parser, run_options


def run(argv: list[str]) -> int:
    options = run_options(build_parser().parse_args(["analyze", *argv]))
    if options["config"].shard is not None or "--device" in argv or any(a.startswith("--device=") for a in argv):
        raise SystemExit("pass neither --shard nor --device: each rank picks its own.")
    out = Path(options.pop("out"))
    rl.tune_allocator()  # as the command line does: malloc thresholds for long streaming passes
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    try:
        try:
            rl.run(**{**options, "config": options["config"].replace(device=device, shard=(rank, world)),
                      "out": out / f"shard-{rank:04d}"})
            code = 0
        except Exception as err:  # reported here; rank 0 learns of it through the gather
            print(f"rope-leak [rank {rank}]: error: {err}", file=sys.stderr)
            code = 1
        codes = [None] * world
        dist.all_gather_object(codes, code)  # also the barrier: every shard is written
        if rank == 0:
            if any(codes):
                print(f"rope-leak: shards failed on ranks {[r for r, c in enumerate(codes) if c]}",
                      file=sys.stderr)
                return 1
            result = rl.merge([out / f"shard-{r:04d}" for r in range(world)], out,
                              overwrite=options["overwrite"])
            print(f"merged {world} shards ({result.analysis.n_prompts} prompts) into {result.out}")
            return 0
        return max(codes)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
