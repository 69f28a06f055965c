"""What the callback reads from the Trainer: the training progress, a checkpoint's saved callback state, and its
own place among the Trainer's callbacks."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

from transformers.trainer_callback import CallbackHandler, TrainerCallback

from ..policies import TrainingProgress

__all__ = ["move_before_reporters", "progress_of", "saved_callback_state"]


def progress_of(args: Any, state: Any) -> TrainingProgress:
    """The `TrainingProgress` of a Trainer's `TrainingArguments` and `TrainerState` (either may be ``None``)."""
    return TrainingProgress(
        step=getattr(state, "global_step", 0) or 0,
        max_steps=getattr(state, "max_steps", 0) or 0,
        epoch=getattr(state, "epoch", 0.0) or 0.0,
        num_epochs=float(getattr(state, "num_train_epochs", 0) or getattr(args, "num_train_epochs", 0) or 0),
        seed=int(getattr(args, "seed", 0) or 0),
    )


def saved_callback_state(state: Any, name: str, options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The `LayerFreezer` state that the callback called ``name`` saved in the checkpoint being resumed.

    The Trainer loads ``stateful_callbacks`` into its state whatever its flags say; several callbacks of one class
    are saved as a list, and the one with the same options is ours. Checkpoints written before the freezer had its
    own state kept the timeline and the probe under ``timeline_changes``/``timeline_selections``/``probe_state``.
    """
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(name)
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


def move_before_reporters(callback: TrainerCallback) -> None:
    """Make ``callback`` run first among the Trainer's callbacks.

    Reporting integrations (TensorBoard, W&B, ...) are added before user callbacks and write `logs` as soon as
    `on_log` reaches them: `freeze/...` metrics must be in `logs` before that. The Trainer does not hand its
    CallbackHandler to callbacks, so find the handler that is calling us.
    """
    frame = inspect.currentframe()
    while frame is not None:
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            if callback in handler.callbacks and handler.callbacks[0] is not callback:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return
        frame = frame.f_back
