"""One rank of a plain training loop with `LayerFreezer`, under FSDP2 (torch's `fully_shard`) or DDP, CPU, gloo.

Run: ``torchrun --standalone --nproc_per_node 2 loop_worker.py SPEC`` (`ddp_launch.launch(..., worker=LOOP_WORKER)`). For each policy and engine it trains a
tiny Llama 4 steps as docs/without-trainer.md shows (``prepare``, wrap, optimizer, then ``update`` /
``before_optimizer_step`` / ``after_optimizer_step`` around each step) and writes ``rank<N>.json``: per step the
frozen and the changed parameters, the final fingerprints, and this rank's optimizer state bytes.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import engines  # noqa: E402
import tiny  # noqa: E402

from hf_freeze import LayerFreezer, TrainingProgress  # noqa: E402
from hf_freeze.model.sharded import local_value  # noqa: E402

POLICIES = {
    "lisa": {"freeze_strategy": "lisa", "freeze_active_layers": 1, "freeze_schedule_every": 1},
    "adaptive": {"freeze_strategy": "adaptive", "freeze_layers": 2, "freeze_probe_steps": 1},
    "bottom": {"freeze_strategy": "bottom", "freeze_layers": 0.5},
}
STEPS = 4


def train(engine: str, options: dict, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = tiny.build("llama", seed=0, num_hidden_layers=4)
    freezer = LayerFreezer(model, freeze_health_check="raise", **options)
    freezer.prepare()
    if engine == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        freezer.reduce_only_trainable(wrapped)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = []
    for step in range(STEPS):
        freezer.update(TrainingProgress(step=step, max_steps=STEPS), optimizer)
        before = engines.whole_parameters(model)
        frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
        generator = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=generator)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        freezer.before_optimizer_step(optimizer)
        optimizer.step()
        freezer.after_optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        after = engines.whole_parameters(model)
        steps.append({"frozen": frozen, "changed": sorted(n for n, v in after.items() if not torch.equal(before[n], v))})
    final = engines.whole_parameters(model)
    state_bytes = sum(local_value(value).numel() * value.element_size() for state in optimizer.state.values()
                      for key, value in state.items() if torch.is_tensor(value) and key != "step")
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    trainable = sum(value.numel() for name, value in final.items() if requires[name])
    return {"status": "ok", "steps": steps, "fingerprints": {n: engines.fingerprint(v) for n, v in final.items()},
            "optimizer_state_bytes": state_bytes, "trainable_params": trainable,
            "total_params": sum(v.numel() for v in final.values()), "health_checks": freezer.health.checks,
            "selections": freezer.timeline.selections}


def main() -> None:
    output = Path(json.loads(Path(sys.argv[1]).read_text())["output_dir"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for engine in ("ddp", "fsdp2"):
        for name, options in POLICIES.items():
            try:
                results[f"{engine}/{name}"] = train(engine, options, rank)
            except Exception as error:  # noqa: BLE001 - the test reports it
                results[f"{engine}/{name}"] = {"status": "error", "error": str(error), "traceback": traceback.format_exc()}
                break
    (output / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
