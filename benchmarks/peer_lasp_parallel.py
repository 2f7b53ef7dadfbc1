"""The LASP package's lasp_fuse_parallel (its ring of sends and receives over NCCL), one process per GPU.

    torchrun --nproc_per_node 2 -m benchmarks.peer_lasp_parallel [--per-gpu 65536] [--out DIR]

bf16, B=1, H=16, d=128 per GPU, TNL slopes; q drawn as normal * d^-0.5 (LASP takes no scale argument: this is
the scaled q the others form inside their kernels). Forward and forward+backward timed with CUDA events around a
fixed number of iterations on every rank (a collective op must run the same number of times everywhere), the
slowest rank's median. Rank 0 writes lasp_peer.json under --out for bench_lasp_gpu's table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from lasp_jax.ops import tnl_slopes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-gpu", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    from lasp import initialize_lasp, lasp_fuse_parallel

    initialize_lasp(data_parallel_size=1, sequence_parallel_size=world)
    b, t, h, d = 1, args.per_gpu, args.heads, args.dim
    gen = torch.Generator(device="cuda").manual_seed(rank)
    q, k = ((torch.randn(b, h, t, d, device="cuda", generator=gen) * d ** -0.5).bfloat16() for _ in range(2))
    v, do = (torch.randn(b, h, t, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    for x in (q, k, v):
        x.requires_grad_(True)
    s = torch.tensor(tnl_slopes(h), device="cuda").reshape(h, 1, 1)
    kv = torch.zeros(b, h, d, d, device="cuda", dtype=torch.float32)
    dkv = torch.zeros_like(kv)

    def fwd():
        with torch.no_grad():
            lasp_fuse_parallel(q, k, v, s, kv, dkv)

    def fwd_bwd():
        lasp_fuse_parallel(q, k, v, s, kv, dkv).backward(do)
        q.grad = k.grad = v.grad = None

    result = {"run": f"{world} GPUs LASP lasp_fuse_parallel, T={world * t}", "gpus": world}
    for name, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        fn()
        times = []
        for _ in range(args.reps):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = torch.tensor([start.elapsed_time(end) / args.iters], device="cuda")
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            times.append(ms.item())
        result[name] = sorted(times)[len(times) // 2]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lasp_peer.json"), "w") as f:
            json.dump(result, f)
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
