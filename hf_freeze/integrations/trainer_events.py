"""What the callback reads from the Trainer: the training progress, a checkpoint's saved callback state, and its
own place among the Trainer's callbacks."""

from __future__ import annotations

import inspect
import json
import os
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import torch
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import FreezeConfigError
from ..logs import get_logger
from ..policies import TrainingProgress
from ..processes import is_main_process
from .backends import FSDP

logger = get_logger(__name__)

__all__ = [
    "add_to_logs", "calling_trainer", "check_checkpoint", "checkpoint_folder", "ddp_wrapper", "guard_resume", "move_before_reporters", "progress_of",
    "read_checkpoint_state", "saved_callback_state",
]


def progress_of(args: Any, state: Any) -> TrainingProgress:
    """The `TrainingProgress` of a Trainer's `TrainingArguments` and `TrainerState` (either may be ``None``)."""
    return TrainingProgress(
        step=getattr(state, "global_step", 0) or 0,
        max_steps=getattr(state, "max_steps", 0) or 0,
        epoch=getattr(state, "epoch", 0.0) or 0.0,
        num_epochs=float(getattr(state, "num_train_epochs", 0) or getattr(args, "num_train_epochs", 0) or 0),
        seed=int(getattr(args, "seed", 0) or 0),
    )


def checkpoint_folder(args: Any, state: Any) -> str:
    """The folder of the checkpoint `on_save` follows, as `Trainer._save_checkpoint` names it."""
    return os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def add_to_logs(state: Any, logs: Dict[str, Any], metrics: Dict[str, float]) -> None:
    """Add ``metrics`` to the ``logs`` an `on_log` event received and to the Trainer's `log_history` entry.

    `Trainer.log` appends its own copy of ``logs`` (with the step) to `state.log_history` before it calls `on_log`
    (transformers 5.23), and no event comes earlier: the entry of this step is updated too, so that the metrics
    land in `trainer_state.json` as well as in the reporters.
    """
    logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def training_input_names(train_dataloader: Any) -> Optional[List[str]]:
    """The names of the training data's inputs: a `datasets.Dataset`'s columns (after the Trainer removed those the
    model does not take), else the keys of the first example of a map-style dataset of dicts; ``None`` when they
    cannot be seen (an iterable dataset, examples that are not dicts)."""
    dataset = getattr(train_dataloader, "dataset", None)
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list):
        return [str(column) for column in columns]
    try:
        first = dataset[0] if dataset is not None and len(dataset) > 0 else None
    except Exception:  # an iterable dataset, or one that cannot be indexed: nothing to see
        return None
    return [str(key) for key in first] if isinstance(first, dict) else None


def read_checkpoint_state(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The `trainer_state.json` of a checkpoint folder as a mapping (``None`` without one); a damaged file is refused
    with its path."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise FreezeConfigError(
            f"Cannot resume from {path}: it is not readable JSON ({error}). Restore it, or resume from another checkpoint."
        ) from None


def saved_callback_state(state: Any, name: str, options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The `LayerFreezer` state that the callback called ``name`` saved in the checkpoint being resumed.

    The Trainer loads ``stateful_callbacks`` into its state whatever its flags say; several callbacks of one class
    are saved as a list, and the one with the same options is ours. Checkpoints written before the freezer had its
    own state kept the timeline and the probe under ``timeline_changes``/``timeline_selections``/``probe_state``.
    """
    callbacks = state.get("stateful_callbacks") if isinstance(state, dict) else getattr(state, "stateful_callbacks", None)
    saved = (callbacks or {}).get(name)
    if isinstance(saved, list):
        saved = next((entry for entry in saved if entry.get("args") == options), saved[0] if saved else None)
    if not isinstance(saved, dict):
        return None
    attributes = saved.get("attributes") or {}
    if "freezer_state" in attributes:
        return attributes["freezer_state"]
    return {
        "options": saved.get("args"),
        "timeline": {"changes": attributes.get("timeline_changes", []), "selections": attributes.get("timeline_selections", [])},
        "probe": attributes.get("probe_state"),
    }


def check_checkpoint(freezer: Any, name: str, checkpoint: str, setup: Any = None, args: Any = None) -> None:
    """Refuse a checkpoint whose freezing state is damaged, or whose optimizer state belongs to other parameters than
    ``freezer``'s run, before the Trainer loads anything from it; a checkpoint made without freezing starts fresh.
    Under FSDP2 (``setup``) a changing policy's frozen set at the checkpoint is applied now, before the wrap and the
    optimizer state's load (`LayerFreezer.take_over_frozen_set`; ``args``: the resuming Trainer's arguments)."""
    trainer_state = read_checkpoint_state(checkpoint)
    if trainer_state is None or freezer is None or freezer.skipped:
        return
    saved = saved_callback_state(trainer_state, name, freezer.arguments.freeze_options())
    if saved is not None:
        freezer.check_resumable(saved, source=os.path.join(checkpoint, TRAINER_STATE_NAME))
        if freezer.dynamic and getattr(setup, "backend", None) == FSDP:
            # The frozen set of the checkpoint's last step (the optimizer state holds what trained in it); epochs
            # advance by the same amount every step.
            step, epoch = int(trainer_state.get("global_step") or 0), float(trainer_state.get("epoch") or 0.0)
            last = SimpleNamespace(global_step=max(step - 1, 0), epoch=epoch * max(step - 1, 0) / step if step else 0.0,
                                   max_steps=trainer_state.get("max_steps"),
                                   num_train_epochs=trainer_state.get("num_train_epochs"))
            freezer.take_over_frozen_set(saved, progress_of(args, last))
    elif is_main_process():
        logger.info(f"{checkpoint} holds no freezing state (made without {name}): it starts fresh.")


def guard_resume(check: Callable[[str, Any], None]) -> bool:
    """Run ``check(checkpoint folder, training arguments)`` when the calling Trainer's `train(resume_from_checkpoint=...)`
    starts.

    The Trainer reads the checkpoint's `trainer_state.json` and loads the optimizer state inside `train()` before any
    callback event, so a damaged file or an optimizer state that belongs to other parameters could not be refused in
    time otherwise. Returns False when no Trainer is calling (then `on_train_begin` checks, after the load but
    before any training step).

    Why the stack and a wrapped `train` (measured on transformers 5.23, not assumed): `Trainer.train` runs
    `_prepare_for_training`, which calls `_load_optimizer_and_scheduler(resume_from_checkpoint)`, before
    `callback_handler.on_train_begin`; no event comes in between, events are not handed the Trainer
    (`CallbackHandler.call_event` passes the model, the processing class, the optimizer, the scheduler and the
    dataloaders), and `on_init_end` is the last event of `Trainer.__init__`. A torch optimizer given the state of
    a different set of parameters either loads it into the wrong parameters or fails with a message that names no
    policy, so the check must run first. A `Trainer` subclass could override `train`, but users pass the callback
    to the plain `Trainer` (and to TRL's trainers).
    """
    trainer = _calling(Trainer)
    if trainer is None:
        return False
    original = trainer.train

    def train(resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(trainer.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            check(str(checkpoint), trainer.args)
        return original(resume_from_checkpoint, *args, **kwargs)

    trainer.train = train
    return True


def move_before_reporters(callback: TrainerCallback) -> None:
    """Make ``callback`` run first among the Trainer's callbacks.

    Reporting integrations (TensorBoard, W&B, ...) are added before user callbacks and write `logs` as soon as
    `on_log` reaches them: `freeze/...` metrics must be in `logs` before that. Measured on transformers 5.23:
    `Trainer.__init__` builds the list as `DEFAULT_CALLBACKS + reporting callbacks + callbacks`, and
    `CallbackHandler.call_event` hands callbacks neither the handler nor the Trainer, so no documented way reaches
    the order; `Trainer.pop_callback`/`add_callback` need the Trainer. Find the handler that is calling us.
    """
    handler = _calling(CallbackHandler)
    if handler is not None and callback in handler.callbacks and handler.callbacks[0] is not callback:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(0, callback)


def ddp_wrapper() -> Optional[torch.nn.parallel.DistributedDataParallel]:
    """The DDP wrapper of the calling Trainer's model (``None`` when it is not wrapped in DDP): callback events hand
    over the unwrapped model only, and the communication hook goes on the wrapper."""
    wrapped = getattr(calling_trainer(), "model_wrapped", None)
    return wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None


def calling_trainer() -> Optional[Trainer]:
    """The Trainer whose method is on the call stack (its `__init__` during `on_init_end`), or ``None``."""
    return _calling(Trainer)


def _calling(kind: type) -> Any:
    """The nearest object of type ``kind`` whose method is on the call stack (the Trainer hands callbacks neither
    itself nor its CallbackHandler)."""
    # Measured reason (transformers 5.23; `guard_resume`, `move_before_reporters`): no event hands a callback the
    # Trainer or its CallbackHandler, and the two things done with them have no event of their own.
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
        frame = frame.f_back
    return None
