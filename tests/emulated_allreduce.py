"""Node program of tests/test_emulated_cluster.py: the bandwidth a gloo all-reduce achieves
between the emulated nodes (one rank per node, from NODE_RANK / NNODES / MASTER_ADDR /
MASTER_PORT).

    python tests/emulated_allreduce.py MIB REPEATS OUT_JSON

Bus bandwidth of an all-reduce of S bytes over W ranks taking t seconds: 2 (W - 1) / W x S / t
(each rank sends and receives that much in a ring or halving-doubling all-reduce; S / t for
W = 2).  Rank 0 writes {"busbw_mbit": [one per repeat], ...} to OUT_JSON.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main():
    mib, repeats, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    rank, world = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world)
    x = torch.ones(int(mib * 2**20) // 4)
    small = torch.ones(1024)
    dist.all_reduce(small)  # connections up before timing
    busbw = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        seconds = time.perf_counter() - t0
        busbw.append(2 * (world - 1) / world * x.numel() * 4 * 8 / seconds / 1e6)
    assert torch.all(x == world ** repeats), "the all-reduce summed wrongly"
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"busbw_mbit": busbw, "bytes": x.numel() * 4, "world": world}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
