"""Probe: how torch DDP behaves when `requires_grad` changes after the wrap (no Trainer, plain torch).

Run: torchrun --standalone --nproc_per_node 2 tests/distributed/probe_ddp_requires_grad.py SCENARIO
Scenarios (each prints one JSON line per rank):
  freeze_then_unfreeze  all trainable at wrap; freeze block 0 after step 1, unfreeze it after step 3
  unfreeze_late         block 0 frozen at wrap; unfrozen after step 1 (the issue's "never all-reduced" fact)
  disagree              all trainable at wrap; rank 0 alone freezes block 0 after step 1
Options: --find-unused 0|1, --static-graph 0|1, --checkpointing none|reentrant|nonreentrant
"""

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.checkpoint import checkpoint


class Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, 1)
        self.mode = mode

    def forward(self, x):
        for block in self.blocks:
            if self.mode == "none":
                x = torch.tanh(block(x))
            else:
                x = checkpoint(lambda t, b=block: torch.tanh(b(t)), x, use_reentrant=self.mode == "reentrant")
        return self.head(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--find-unused", type=int, default=1)
    parser.add_argument("--static-graph", type=int, default=0)
    parser.add_argument("--checkpointing", default="none")
    parser.add_argument("--steps", type=int, default=5)
    options = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net(options.checkpointing)
    block0 = list(net.blocks[0].parameters())
    if options.scenario == "unfreeze_late":
        for p in block0:
            p.requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(
        net, find_unused_parameters=bool(options.find_unused), static_graph=bool(options.static_graph)
    )
    reduced = []

    def counting_hook(state, bucket):
        reduced[-1] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # all params: frozen ones have grad None and are skipped
    result = {"rank": rank, "scenario": options.scenario, **{k: v for k, v in vars(options).items() if k != "scenario"}}
    events = []
    try:
        for step in range(1, options.steps + 1):
            if step == 2 and options.scenario in ("freeze_then_unfreeze", "disagree"):
                if options.scenario == "freeze_then_unfreeze" or rank == 0:
                    for p in block0:
                        p.requires_grad_(False)
                        p.grad = None
                    events.append(f"froze block0 before step {step}")
            if step == 4 and options.scenario == "freeze_then_unfreeze":
                for p in block0:
                    p.requires_grad_(True)
                events.append(f"unfroze block0 before step {step}")
            if step == 2 and options.scenario == "unfreeze_late":
                for p in block0:
                    p.requires_grad_(True)
                events.append(f"unfroze block0 before step {step}")
            reduced.append(0)
            before = block0[0].detach().clone()
            generator = torch.Generator().manual_seed(100 * step + rank)  # different data per rank
            x = torch.randn(8, 16, generator=generator)
            loss = ddp(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            events.append(f"step {step}: block0 moved={not torch.equal(before, block0[0])}")
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - the probe reports whatever DDP raises
        result["status"] = f"error at step {len(reduced)}: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    result["bytes_reduced_per_step"] = reduced
    result["events"] = events
    checksum = torch.tensor([float(sum(p.detach().double().sum() for p in net.parameters()))], dtype=torch.float64)
    result["checksum"] = round(float(checksum), 10)
    try:
        gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, checksum)
        result["ranks_identical"] = all(torch.equal(g, gathered[0]) for g in gathered)
    except Exception as error:  # noqa: BLE001
        result["ranks_identical"] = f"could not compare: {type(error).__name__}"
    print(json.dumps(result), flush=True)
    os._exit(0)  # a failed DDP state can hang the process-group teardown


if __name__ == "__main__":
    main()
