"""`FreezeCallback`: thin glue from Trainer events to `LayerFreezer`."""

from __future__ import annotations

from typing import Any, Dict, Optional

from transformers.trainer_callback import ExportableState, TrainerCallback

from ..add_on import RunContext
from ..config import FreezeArguments, arguments_from, resolve_arguments
from ..config.training import CALLBACK_ATTACHED
from ..errors import FreezeConfigError
from ..logs import follow_training_log_level
from ..model import unwrap_model
from ..policies.adaptive import check_against_loss_scaling
from ..processes import raise_if_ranks_disagree
from ..report import TIMELINE_JSON
from ..engine import LayerFreezer
from .optimizer_groups import install_parameter_groups
from .support import check_backend, raise_if_changed_after_wrap
from .trainer_events import add_to_logs, check_checkpoint, guard_resume, move_before_reporters, progress_of
from .trainer_events import checkpoint_folder, ddp_wrapper, saved_callback_state, training_input_names

__all__ = ["FreezeCallback"]


class FreezeCallback(TrainerCallback, ExportableState):
    """Freeze model layers by policy inside a `transformers.Trainer`.

    The policy comes from the constructor (`FreezeArguments` or `freeze_*` keywords), else from the `TrainingArguments`
    (`FreezeTrainingArguments`). A static policy is applied in `on_init_end`, before the optimizer and the wrapper (DDP,
    FSDP, DeepSpeed) see the model, after a check against the backend. A schedule or an adaptive policy leaves trainable
    all it may train, then applies each step's frozen set from `on_train_begin` on (under DDP reducing only what
    trains); checkpoints carry its state; with rates per part or layer the optimizer is built from `parameter_groups`.

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
        self._setup, self._tokenizer = None, None

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled for a Ray Tune worker: the policy travels, not its hooks; `train()` there sets up on its own model.
        return {**self.__dict__, "freezer": None, "_setup": None}

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        move_before_reporters(self)
        self._tokenizer = processing_class
        self._set_up(args, state, model, late=False)
        install_parameter_groups(self, args, model)
        guard_resume(lambda folder, args: check_checkpoint(self.freezer, type(self).__name__, folder, self._setup, args))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        move_before_reporters(self)
        rebuilt = self.freezer is not None and model is not None and unwrap_model(model) is not self.freezer.model
        if rebuilt:
            # `train()` built a new model with `model_init` (every call does; a hyperparameter search's trial too):
            # the policy applies to it, from the training arguments as they are now (a trial may have set them).
            self.freezer.close()
            self.freezer = None
        if self.freezer is None:  # added after Trainer.__init__, or rebuilt from a checkpoint's callback state
            self._set_up(args, state, model, late=True)
        if self.freezer.skipped:
            return
        progress = progress_of(args, state)
        saved = saved_callback_state(state, type(self).__name__, self.freezer.arguments.freeze_options()) if progress.step > 0 else None
        # A checkpoint made without this callback has no entry for it, and the Trainer's save would fail on that.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if not self.freezer.dynamic:
            raise_if_changed_after_wrap(self._setup, self.freezer.would_change(progress), model_init=rebuilt)
        check_against_loss_scaling(self.freezer.arguments, bool(args.fp16), (args.max_grad_norm or 0) > 0)
        self.freezer.reduce_only_trainable(ddp_wrapper())  # a changing policy under DDP: only what trains is reduced
        self.freezer.start(progress, optimizer, saved, source="the checkpoint's trainer_state.json")
        raise_if_ranks_disagree(self.freezer.frozen_names())
        self.freezer.log(self.freezer.check_inputs(training_input_names(train_dataloader), bool(self._setup and self._setup.strict_ddp)))
        self.freezer.check_data(train_dataloader)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._drives_steps() and self.freezer.dynamic:
            self.freezer.log(self.freezer.describe_update(self.freezer.update(progress_of(args, state), optimizer)))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._drives_steps():
            self.freezer.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._drives_steps():
            self.freezer.after_optimizer_step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        self._write_outputs(args, state, checkpoint_folder(args, state))

    def on_train_end(self, args, state, control, **kwargs):
        self._write_outputs(args, state, args.output_dir)
        if self.freezer is not None:
            self.freezer.close()  # the frozen-prefix cache's states (unless `freeze_cache_keep`)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.freezer is not None and logs is not None:
            add_to_logs(state, logs, self.freezer.metrics())

    def state(self) -> Dict[str, Any]:
        """For checkpoints (`ExportableState`): the constructor's arguments and the freezer's state."""
        arguments = self.freezer.arguments if self.freezer is not None else (self._given or FreezeArguments())
        # `ExportableState.from_state` sets each attribute on a new instance: this name must not be one of ours.
        attributes = {"freezer_state": self.freezer.state_dict()} if self.freezer is not None else {}
        return {"args": arguments.freeze_options(), "attributes": attributes}

    def _set_up(self, args, state, model, late: bool) -> None:
        follow_training_log_level(args)
        setattr(args, CALLBACK_ATTACHED, True)  # the policy of FreezeTrainingArguments has its callback
        if model is None:
            raise FreezeConfigError("FreezeCallback needs the model: the Trainer passes it to its callbacks.")
        run = RunContext(output_dir=str(args.output_dir), tokenizer=self._tokenizer)
        self.freezer = LayerFreezer(model, resolve_arguments(self._given, args), run=run)
        if self.freezer.skipped:  # a PEFT adapter decides what trains; the freezer has said so
            return
        decision = self.freezer.decide(progress_of(args, state))
        self._setup = check_backend(args, self.freezer, decision)
        if self.freezer.dynamic:
            # Each step's frozen set applies from on_train_begin on, once the optimizer and DDP registered everything.
            self.freezer.prepare()
            wrapper = f" and {self._setup.describe()}" if self._setup.multi_process else ""
            self.freezer.log([f"strategy {self.freezer.strategy.name!r} changes the frozen set during training: all it may train "
                              f"stays trainable until the optimizer{wrapper} registered it; changes go to {args.output_dir}/{TIMELINE_JSON}."])
        elif not late:  # added late, the model may be wrapped already: on_train_begin checks before applying
            self.freezer.apply(decision=decision)
            self.freezer.log(self.freezer.report_lines())

    def _drives_steps(self) -> bool:
        return self.freezer is not None and not self.freezer.skipped

    def _write_outputs(self, args, state, folder: str) -> None:  # the timeline, and a `freeze_lora` adapter
        if self.freezer is not None and state.is_world_process_zero:
            self.freezer.write_timeline(getattr(args, "output_dir", None), end_step=state.global_step)
            self.freezer.save_add_ons(folder)
