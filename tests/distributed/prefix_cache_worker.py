"""One rank of the 2-process frozen-prefix cache test: the same Trainer run with and without `freeze_cache_prefix`.

Launched by tests/integrations/test_prefix_cache_ddp.py (``torchrun --standalone --nproc_per_node 2 THIS OUT``).
Each rank writes ``rank<N>.json``: both runs' losses, a digest and a few values of the final weights, the cache's
counts and the folder it wrote to.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import tiny  # noqa: E402
from prefix_cache_data import VariableLengthData, pad_right  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_freeze import FreezeCallback  # noqa: E402

POLICY = dict(freeze_strategy="bottom", freeze_layers=2, freeze_frozen_modules_eval=True)


class CacheFolder(TrainerCallback):
    """Records the files of the cache folder while training runs (it is deleted when training ends)."""

    def __init__(self, freeze):
        self.freeze, self.files = freeze, None

    def on_epoch_end(self, args, state, control, **kwargs):
        cache = self.freeze.freezer.prefix_cache
        if cache is not None and cache.store.directory and os.path.isdir(cache.store.directory):
            self.files = [cache.store.directory, sorted(os.listdir(cache.store.directory))]


def run(output_dir: Path, cached: bool) -> dict:
    model = tiny.build("bert")
    options = dict(POLICY, freeze_cache_prefix=True, freeze_cache_memory_mb=0) if cached else POLICY
    freeze = FreezeCallback(**options)
    folder = CacheFolder(freeze)
    args = TrainingArguments(**tiny.training_kwargs(
        output_dir / ("cached" if cached else "plain"), max_steps=-1, num_train_epochs=3, per_device_train_batch_size=4,
        ddp_backend="gloo",
    ))
    trainer = Trainer(model=model, args=args, train_dataset=VariableLengthData(), data_collator=pad_right,
                      callbacks=[freeze, folder])
    trainer.train()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "weights": weights[::97].tolist(),
    }
    if cached:
        result["stats"] = freeze.freezer.prefix_cache.stats()
        result["folder"] = folder.files
        dist.barrier()  # both processes have finished (and cleaned up)
        result["folder_after"] = os.path.exists(str(output_dir / "cached" / "frozen_prefix_cache"))
    return result


def main() -> None:
    output_dir = Path(sys.argv[1])
    results = {"plain": run(output_dir, cached=False), "cached": run(output_dir, cached=True)}
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    (output_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
