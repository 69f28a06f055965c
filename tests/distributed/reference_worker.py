"""One rank of the 2-process test of `reference_model` under DDP (CPU, gloo), launched by `ddp_launch.launch` with
this file as its worker (``tests/integrations/test_reference.py``). Same SPEC and output protocol as
`train_worker.py`: ``{"output_dir": ..., "runs": [{"label", "kind"}, ...]}`` in, ``rank<N>.json`` out.

Kinds:

- ``"gradual_unfreezing"``: a plain DDP loop with a `LayerFreezer` unfreezing one layer a step; each process builds
  its own reference from the same weights after the first frozen set is applied, and computes reference
  log-probabilities between the policy's forward and its backward (as DPO does). Records, per step, how far the
  reference is from a deep copy taken when it was built, and at the end the parameters' digests and what was copied.
- ``"sharded"``: a DTensor parameter (as FSDP2 makes them) is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import tiny  # noqa: E402

from hf_freeze import LayerFreezer, TrainingProgress  # noqa: E402
from hf_freeze.reference import reference_model, reference_state  # noqa: E402

STEPS = 3


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def digest(model: nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, parameter in model.named_parameters():
        hasher.update(name.encode() + parameter.detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def gradual_unfreezing(rank: int) -> dict:
    model = tiny.build("llama", seed=0)  # identical weights on every rank
    freezer = LayerFreezer(model, freeze_strategy="gradual_unfreezing", freeze_schedule_unit="step",
                           freeze_schedule_every=1, freeze_unfreeze_layers=1, freeze_layers=3)
    freezer.prepare()  # everything the schedule may train is registered with DDP
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    freezer.update(TrainingProgress(step=0, max_steps=STEPS), optimizer)
    reference = reference_model(wrapped)
    snapshot = copy.deepcopy(model).eval()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = reference_state(reference)
    shared_at_start = list(state.shared_names)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    differences = []
    for step in range(STEPS):
        freezer.update(TrainingProgress(step=step, max_steps=STEPS), optimizer)
        input_ids = torch.randint(1, 128, (4, 12), generator=generator)
        loss = wrapped(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        with torch.no_grad():
            from_reference = token_log_probs(reference(input_ids=input_ids, use_cache=False).logits, input_ids)
            from_snapshot = token_log_probs(snapshot(input_ids=input_ids, use_cache=False).logits, input_ids)
        differences.append((from_reference - from_snapshot).abs().max().item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    probe = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        final = (token_log_probs(reference(input_ids=probe, use_cache=False).logits, probe)
                 - token_log_probs(snapshot(input_ids=probe, use_cache=False).logits, probe)).abs().max().item()
    trained = sorted(name for name, p in model.named_parameters() if not torch.equal(p.detach(), initial[name]))
    return {
        "differences": differences,
        "final_difference": final,
        "shared_forwards": state.shared_forwards,
        "full_forwards": state.full_forwards,
        "shared_at_start": shared_at_start,
        "copied_on_unfreeze": state.copied_on_unfreeze,
        "still_shared": state.shared_names,
        "trained": trained,
        "reference_digest": digest(reference),
        "policy_digest": digest(model),
    }


def sharded(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
    reference_model(layer)
    return {}


KINDS = {"gradual_unfreezing": gradual_unfreezing, "sharded": sharded}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    output_dir = Path(spec["output_dir"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for run in spec["runs"]:
        try:
            results[run["label"]] = {"status": "ok", **KINDS[run["kind"]](rank)}
        except Exception as error:  # noqa: BLE001 - the test judges the error (refusals are expected results)
            results[run["label"]] = {"status": "error", "error_type": type(error).__name__, "error": str(error),
                                     "traceback": traceback.format_exc()[-3000:]}
    (output_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
