"""What the stop vote (engine/preempt.py) costs a training step: two gloo ranks run a stand-in step (a matmul
and a gradient-sized all-reduce) with and without the vote (``decide()`` + ``post()``) at every boundary, alternating rounds,
and report the time the vote takes and the step time with / without it (ratios within one run).

    python -m benchmarks.preempt_vote [--steps 200] [--rounds 5] [--out benchmarks/results/preempt_vote.json]

On a GPU node the default process group can be NCCL (``--backend nccl``): the vote still runs on its own gloo
group with host tensors, so its cost does not depend on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def stand_in_step(x: torch.Tensor, grad: torch.Tensor) -> None:
    for _ in range(4):
        x = torch.tanh(x @ x) * 0.5
    dist.all_reduce(grad)
    if x.is_cuda:
        torch.cuda.synchronize()  # a step that ends on the device, as a real one reads nothing but waits here


def rank_main(rank: int, world: int, port: int, args, queue) -> None:
    from engine.preempt import StopSignals, StopVote

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    x = torch.randn(args.size, args.size, device=device) / args.size ** 0.5
    grad = torch.randn(args.grad_numel, device=device)
    with StopSignals() as signals:
        vote = StopVote(signals)
        times = {"off": [], "on": []}
        for r in range(args.rounds * 2 + 1):
            mode = "on" if r % 2 else "off"
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                stand_in_step(x, grad)
                if mode == "on":
                    assert vote.decide() is None
                    vote.post()
            if r:  # round 0 warms up
                times[mode].append((time.perf_counter() - started) / args.steps)
        vote.close()
    if rank == 0:
        queue.put({"step_s_off": statistics.median(times["off"]), "step_s_on": statistics.median(times["on"]),
                   "poll_us": 1e6 * vote.seconds / max(1, vote.polls), "polls": vote.polls})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=192, help="the stand-in step's matmul size")
    p.add_argument("--grad-numel", type=int, default=1 << 18, help="the stand-in gradient all-reduce")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from engine.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(rank_main, args=(2, free_port(), args, queue), nprocs=2, join=True)
    res = queue.get()
    res.update(backend=args.backend, steps=args.steps, rounds=args.rounds,
               overhead=res["step_s_on"] / res["step_s_off"] - 1, poll_share=res["poll_us"] / 1e6 / res["step_s_off"])
    print(f"step {1e3 * res['step_s_off']:.2f} ms without the vote, {1e3 * res['step_s_on']:.2f} ms with it "
          f"({100 * res['overhead']:+.2f}%); the vote {res['poll_us']:.0f} us per step "
          f"({100 * res['poll_share']:.2f}% of a step) over {res['polls']} polls ({args.backend})")
    if args.out:
        from engine.checkpoint import atomic_write_json

        atomic_write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
