"""Two gloo processes on loopback, each holding half the student vocabulary: the dense term and its gradient.

Run by tests/test_dense_loss.py as ``python dense_tp_worker.py <inputs.pt> <out_dir> <port>``; writes
``rank<r>.pt`` with the per-token divergence, the student tail and the gradient of this rank's logit slice.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_xvocab.dense_loss import dense_term

WORLD = 2


def run(rank: int, inputs: str, out_dir: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = torch.load(inputs, weights_only=False)
        full = data["logits"]
        width = full.size(-1) // WORLD
        local = full[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
        terms = dense_term(local, data["targets"], data["total_lengths"], data["response_lengths"],
                           kind=data["kind"], temperature=data["temperature"], vocab_start=rank * width,
                           vocab_size=full.size(-1), group=dist.group.WORLD, chunk_rows=data.get("chunk_rows", -1))
        (terms["divergence"] * data["weights"]).sum().backward()
        torch.save({"divergence": terms["divergence"].detach(), "student_tail": terms["student_tail"],
                    "grad": local.grad}, f"{out_dir}/rank{rank}.pt")
        # Both ranks are done with the group before either tears it down: a rank that destroys it while the
        # other still talks to it aborts in gloo's background thread ("terminate called without an active
        # exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], int(sys.argv[3])), nprocs=WORLD, join=True)
