"""`FreezeCallback`: thin glue from Trainer events to `LayerFreezer`."""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState

from .config import FreezeArguments, freeze_arguments_from
from .distributed import DistributedSetup, plan_for, raise_if_changed_after_wrap, raise_if_ranks_disagree
from .errors import FreezeConfigError
from .freezer import LayerFreezer, arguments_from
from .logging import follow_training_log_level, get_logger
from .policies import TrainingProgress
from .policies.adaptive import check_against_training
from .timeline import TIMELINE_JSON, describe_change, describe_selection

logger = get_logger(__name__)

__all__ = ["FreezeCallback"]


class FreezeCallback(TrainerCallback, ExportableState):
    """Freeze model layers by policy inside a `transformers.Trainer`.

    The policy comes from the constructor (a `FreezeArguments` or `freeze_*` keywords) or, when the constructor
    gets none, from the `TrainingArguments` when they carry `freeze_*` fields (`FreezeTrainingArguments`).

    A static policy is applied in `on_init_end`, inside `Trainer.__init__`: before the Trainer builds its
    optimizer (which then holds trainable parameters only, so frozen ones get no optimizer state) and before
    DDP wraps the model (which then all-reduces trainable parameters only). Before applying anything it checks the
    policy against the backend (DDP, FSDP, DeepSpeed; `hf_freeze.distributed`) and refuses, with the setting that
    fixes it, a combination that would crash mid-run or let the processes drift apart.

    A schedule (``progressive``, ``gradual_unfreezing``, ``lisa``, ``badam``) or an adaptive policy (``adaptive``,
    whose probes measure the scores it selects from) makes every parameter it may ever train trainable in
    `on_init_end`, so the optimizer registers them all, then applies each step's frozen set in `on_train_begin` and
    `on_step_begin`, through the one applier (released optimizer state, ``grad=None``). A resumed run recomputes the
    frozen set from the step (and the scores saved in the checkpoint); the timeline so far comes from the checkpoint.
    The timeline is written to ``args.output_dir`` as ``freeze_timeline.json`` and ``freeze_timeline.png``.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments
    >>> from hf_freeze import FreezeCallback
    >>> config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
    ...                               intermediate_size=64, vocab_size=100)
    >>> model = AutoModelForSequenceClassification.from_config(config)
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", report_to="none"),
    ...                   callbacks=[FreezeCallback(freeze_strategy="bottom", freeze_layers=0.5)])
    >>> model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    False
    ```
    """

    def __init__(self, arguments: Optional[FreezeArguments] = None, **options: Any):
        self._given = arguments_from(arguments, options)
        self.freezer: Optional[LayerFreezer] = None
        self._setup: Optional[DistributedSetup] = None

    # -- Trainer events -------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._move_before_reporters()
        self._set_up(args, state, model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._move_before_reporters()
        if self.freezer is None:  # added after Trainer.__init__, or rebuilt from a checkpoint's callback state
            self._set_up(args, state, model, late=True)
        if self.freezer.skipped:
            return
        if self.freezer.dynamic:
            self._start_schedule(args, state, optimizer)
        else:
            progress = self._progress(args, state)
            raise_if_changed_after_wrap(self._setup, self.freezer.applier.parameters, self.freezer.decide(progress))
            change = self.freezer.apply(progress, optimizer)
            if change.changed and state.is_world_process_zero:
                logger.warning(
                    f"{len(change.frozen) + len(change.unfrozen)} parameters no longer matched the freezing policy "
                    "when training began (something changed requires_grad after the Trainer was built); re-applied."
                )
        raise_if_ranks_disagree(self.freezer.applier.frozen_names())

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.freezer is not None and self.freezer.dynamic:
            self._report_change(state, self.freezer.update(self._progress(args, state), optimizer))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.freezer is not None and self.freezer.dynamic:
            self.freezer.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.freezer is not None and self.freezer.dynamic:
            self.freezer.after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        self._write_timeline(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write_timeline(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.freezer is None or logs is None:
            return
        metrics = self.freezer.metrics()
        logs.update(metrics)
        # The Trainer stored its copy of `logs` before calling us: keep `log_history` in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # -- state for checkpoints (ExportableState) -----------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        arguments = self.freezer.arguments if self.freezer is not None else (self._given or FreezeArguments())
        timeline = self.freezer.timeline if self.freezer is not None else None
        attributes = {
            "timeline_changes": timeline.changes if timeline else [],
            "timeline_selections": timeline.selections if timeline else [],
        }
        if self.freezer is not None and self.freezer.probe is not None:
            attributes["probe_state"] = self.freezer.probe.state_dict()
        return {"args": arguments.freeze_options(), "attributes": attributes}

    # -- helpers --------------------------------------------------------------------------------------------------

    def _resolve_arguments(self, training_args) -> FreezeArguments:
        from_training_args = freeze_arguments_from(training_args)
        if self._given is None:
            return from_training_args or FreezeArguments()
        if from_training_args is not None and from_training_args.is_active():
            theirs, ours = from_training_args.freeze_options(), self._given.freeze_options()
            differing = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
            if differing:
                detail = ", ".join(f"`{k}`: {a!r} vs {b!r}" for k, (a, b) in differing.items())
                raise FreezeConfigError(
                    "The freezing policy is given twice, by FreezeCallback(...) and by the TrainingArguments, and "
                    f"they differ ({detail}). Give it in one place."
                )
        return self._given

    def _set_up(self, args, state, model, late: bool = False) -> None:
        follow_training_log_level(args)
        if model is None:
            raise FreezeConfigError("FreezeCallback needs the model: the Trainer passes it to its callbacks.")
        self.freezer = LayerFreezer(model, self._resolve_arguments(args))
        main = state is None or state.is_world_process_zero
        if self.freezer.skipped:
            if main:
                logger.warning(
                    f"FreezeCallback: freezing is skipped and nothing is changed, because {self.freezer.peft_reason}: "
                    "the adapter already decides what trains. To train extra modules, list them in the PEFT "
                    "config's `modules_to_save`."
                )
            return
        progress = self._progress(args, state)
        decision = self.freezer.decide(progress)
        self._setup, _ = plan_for(args, self.freezer.model, self.freezer.arguments, decision)
        if self.freezer.dynamic:
            # Every parameter the schedule may ever train stays trainable until the optimizer and DDP have
            # registered it; each step's frozen set then applies from on_train_begin on.
            self.freezer.prepare(progress)
            if main:
                logger.info(
                    f"strategy {self.freezer.arguments.freeze_strategy!r} changes the frozen set during training: "
                    f"every parameter it may train stays trainable until {self._setup.describe()} registered it, "
                    "then each step's frozen set "
                    f"applies; changes are logged and written to {os.path.join(str(args.output_dir), TIMELINE_JSON)}."
                )
            return
        if late:  # the model may be wrapped already: applying must not flip requires_grad then
            raise_if_changed_after_wrap(self._setup, self.freezer.applier.parameters, decision)
        self.freezer.apply(decision=decision)
        self._log_decision(main)

    def _log_decision(self, main: bool) -> None:
        if main:
            for note in self.freezer.layout.notes + (self.freezer.decision.notes if self.freezer.decision else ()):
                logger.info(note)
            logger.info(f"strategy {self.freezer.arguments.freeze_strategy!r}: {self.freezer.summary()}")
            logger.info("\n" + self.freezer.table())

    def _start_schedule(self, args, state, optimizer) -> None:
        progress = self._progress(args, state)
        # Apply in full, whatever ran before: a second `train()` call on the same Trainer starts over.
        self.freezer.decision = None
        self.freezer.timeline.restore([], before_step=0)
        probe = self.freezer.probe
        if probe is not None:
            check_against_training(self.freezer.arguments, progress.max_steps)
            probe.reset()
        saved = self._saved_state(state) if progress.step > 0 else None
        if saved is not None:
            if saved.get("args") != self.freezer.arguments.freeze_options() and state.is_world_process_zero:
                logger.warning(
                    "The freezing policy differs from the one in the checkpoint's trainer_state.json; the frozen set "
                    f"follows the current policy from step {progress.step} on."
                )
            attributes = saved.get("attributes", {})
            self.freezer.timeline.restore(
                attributes.get("timeline_changes", []), progress.step, attributes.get("timeline_selections", [])
            )
            if probe is not None and attributes.get("probe_state"):
                probe.load_state_dict(attributes["probe_state"], progress.step)
        self._report_change(state, self.freezer.update(progress, optimizer), force=True)
        if state.is_world_process_zero:
            for note in self.freezer.layout.notes + self.freezer.decision.notes:
                logger.info(note)
            logger.info("\n" + self.freezer.table())

    def _saved_state(self, state) -> Optional[Dict[str, Any]]:
        """This callback's state in the checkpoint being resumed (the Trainer loads it whatever its flags say)."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            ours = self.freezer.arguments.freeze_options()
            saved = next((entry for entry in saved if entry.get("args") == ours), saved[0] if saved else None)
        return saved if isinstance(saved, dict) else None

    def _report_change(self, state, change, force: bool = False) -> None:
        if not state.is_world_process_zero:
            return
        probe = self.freezer.probe
        if probe is not None and probe.last_selection is not None:
            logger.info(describe_selection(self.freezer.timeline.selections[-1], self.freezer.layout, probe))
        if not (change.changed or force) or not self.freezer.timeline.changes:
            return
        changes = self.freezer.timeline.changes
        logger.info(describe_change(changes[-1], changes[-2] if len(changes) > 1 else None, self.freezer.layout))

    def _write_timeline(self, args, state) -> None:
        if self.freezer is None or not self.freezer.dynamic or not state.is_world_process_zero:
            return
        output_dir = getattr(args, "output_dir", None)
        if output_dir:
            self.freezer.timeline.write(output_dir, end_step=state.global_step)

    @staticmethod
    def _progress(args, state) -> TrainingProgress:
        return TrainingProgress(
            step=getattr(state, "global_step", 0) or 0,
            max_steps=getattr(state, "max_steps", 0) or 0,
            epoch=getattr(state, "epoch", 0.0) or 0.0,
            num_epochs=float(getattr(state, "num_train_epochs", 0) or getattr(args, "num_train_epochs", 0) or 0),
            seed=int(getattr(args, "seed", 0) or 0),
        )

    def _move_before_reporters(self) -> None:
        """Run first among the Trainer's callbacks.

        Reporting integrations (TensorBoard, W&B, ...) are added before user callbacks and write `logs` as soon
        as `on_log` reaches them: `freeze/...` metrics must be in `logs` before that. The Trainer does not hand
        its CallbackHandler to callbacks, so find the handler that is calling us.
        """
        frame = inspect.currentframe()
        while frame is not None:
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler):
                if self in handler.callbacks and handler.callbacks[0] is not self:
                    handler.callbacks.remove(self)
                    handler.callbacks.insert(0, self)
                return
            frame = frame.f_back
