"""Probe: torch FSDP1 / FSDP2 on CPU (gloo) with frozen parameters, static and changed after the wrap.

Through the Trainer, FSDP cannot run on CPU in this stack: accelerate's FSDP1 plugin raises "no available devices"
and an FSDP2 accelerate config on CPU silently falls back to DDP. This probe wraps with torch directly. On
torch 2.13 FSDP1 raises "FSDP needs a non-CPU accelerator device" at the wrap; FSDP2 runs on CPU with gloo.
Run: torchrun --standalone --nproc_per_node 2 tests/distributed/probe_fsdp.py {fsdp1|fsdp1_orig|fsdp2} {static|unfreeze_late|freeze_late}
"""

import datetime
import functools
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def main():
    kind, scenario = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net()
    frozen_names = ["embed.weight", "embed.bias", "blocks.0.weight", "blocks.0.bias"]  # a "bottom" policy
    frozen = [dict(net.named_parameters())[name] for name in frozen_names]
    if scenario in ("static", "unfreeze_late"):
        for p in frozen:
            p.requires_grad_(False)
    result = {"rank": rank, "kind": kind, "scenario": scenario}
    stage = "wrap"
    try:
        if kind.startswith("fsdp1"):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            model = FSDP(net, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}) if "units" in kind else None,
                         use_orig_params=kind.startswith("fsdp1_orig"), device_id=None)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in net.blocks:
                fully_shard(block)
            model = fully_shard(net)
        # FSDP2 swaps in new (DTensor) Parameter objects: look the frozen ones up again by name.
        frozen = [dict(net.named_parameters())[name] for name in frozen_names]
        optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
        stage = "train"
        moved = []
        for step in range(1, 5):
            if step == 2 and scenario == "unfreeze_late":
                for p in frozen:
                    p.requires_grad_(True)
            if step == 2 and scenario == "freeze_late":
                for p in frozen:
                    p.requires_grad_(False)
            before = [p.detach().clone() for p in frozen]
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + rank))
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moved.append(any(not torch.equal(b, p.detach()) for b, p in zip(before, frozen)))
        result["status"] = "ok"
        result["bottom_moved_per_step"] = moved
        # Compare the full parameters across ranks.
        if kind.startswith("fsdp1"):
            with FSDP.summon_full_params(model):
                total = sum(float(p.detach().double().sum()) for p in net.parameters())
        else:
            total = sum(float(p.full_tensor().double().sum()) for p in net.parameters())
        tensor = torch.tensor([total], dtype=torch.float64)
        gathered = [torch.zeros_like(tensor) for _ in range(2)]
        dist.all_gather(gathered, tensor)
        result["ranks_identical"] = bool(torch.equal(gathered[0], gathered[1]))
    except Exception as error:  # noqa: BLE001
        result["status"] = f"error at {stage}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
