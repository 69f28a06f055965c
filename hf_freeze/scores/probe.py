"""`LayerProbe`: runs the probes of an adaptive policy and keeps the scores each round selected from.

It is the torch side of `hf_freeze.policies.adaptive`: at the start of each step it starts or finishes the round's
probe (`hf_freeze.scores`), makes every process agree on the scores (the main process's are broadcast), and hands
the current round's scores to the pure policy through `TrainingProgress.layer_scores`. While a probe withholds its
optimizer steps (`freeze_probe_mode: measure`, `withholding`), the meter is told of each withheld step; dropping the
gradients is the applier's job. Its state (the scores of
every round, and a probe in progress) is JSON-safe, so a checkpoint taken at any step resumes exactly.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..logs import get_logger
from ..model.layout import ModelLayout
from ..policies import SCORES, TrainingProgress
from ..policies.adaptive import adaptive_round, probe_length, probe_mode, score_name
from ..processes import broadcast_from_main, is_main_process
from .meter import ScoreMeter, build_meter

__all__ = ["LayerProbe"]

# The weight-change meter's sample of entries only has to be the same in every process and after a resume.
_SAMPLE_SEED = 0

logger = get_logger(__name__)


class LayerProbe:
    """Measures per-layer scores for adaptive freezing, round by round.

    Args:
        model: The (unwrapped) model.
        layout: Its blocks; the layers are the candidates.
        arguments: The `FreezeArguments` of an adaptive policy.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_freeze import FreezeArguments, TrainingProgress, discover_layout
    >>> from hf_freeze.scores import LayerProbe
    >>> config = AutoConfig.for_model("gpt2", n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> options = FreezeArguments(freeze_strategy="adaptive", freeze_layers=2, freeze_score="snr")
    >>> probe = LayerProbe(model, discover_layout(model), options)
    >>> len(probe.at(TrainingProgress(step=0, max_steps=10)).layer_scores)
    4
    ```
    """

    def __init__(
        self, model: nn.Module, layout: ModelLayout, arguments: Any, parameters: Optional[Dict[str, nn.Parameter]] = None,
    ):
        self.arguments = arguments
        self.score = SCORES.get(score_name(arguments))
        self.layout = layout
        # The model's parameters by name; a mapping kept up to date by its owner (the applier follows FSDP2's
        # replacement of every parameter), read when each probe begins.
        self.parameters = parameters if parameters is not None else dict(model.named_parameters())
        self.rounds: Dict[int, Dict[str, Any]] = {}
        self.meter: Optional[ScoreMeter] = None
        self.meter_round: Optional[int] = None
        self.meter_start_step = 0
        # Cost of scoring (meter work and agreement), and the wall time of the probes it was spent in.
        self.scoring_seconds = 0.0
        self.probe_seconds = 0.0
        self._probe_began: Optional[float] = None
        self.last_selection: Optional[Dict[str, Any]] = None

    @property
    def layers(self):
        """The candidate layers with their parameters as they are now: ``[(block name, [(name, parameter), ...])]``."""
        parameters = self.parameters
        return [
            (block.name, [(name, parameters[name]) for name in block.parameters if name in parameters])
            for block in self.layout.layers
        ]

    # -- driving ----------------------------------------------------------------------------------------------------

    def at(self, progress: TrainingProgress) -> TrainingProgress:
        """Start or finish a probe as `progress` requires; `progress` with the current round's scores (if any).

        `last_selection` is the round whose probe this call finished, else ``None``.
        """
        self.last_selection = None
        current = adaptive_round(self.arguments, progress)
        if current.index not in self.rounds:
            if self.meter_round != current.index:
                if self.score.needs_probe and not current.probing(progress.step) and is_main_process():
                    logger.warning(
                        f"adaptive: round {current.index}'s probe should have begun at step {current.start}, but its "
                        f"measurements are missing (a checkpoint without them?): probing from step {progress.step}; "
                        "until it ends nothing is frozen."
                    )
                self._start(current.index, progress.step)
            if progress.step >= self.meter_start_step + probe_length(self.arguments, progress.max_steps):
                self._finish(current.index, progress)
        return self.with_scores(progress)

    def with_scores(self, progress: TrainingProgress) -> TrainingProgress:
        """`progress` with the scores of its round when they are measured already (no probe is started)."""
        entry = self.rounds.get(adaptive_round(self.arguments, progress).index)
        return replace(progress, layer_scores=None if entry is None else tuple(entry["scores"]))

    def metrics(self) -> Dict[str, float]:
        """The scores the current selection was made from (`freeze/score_layer_<i>`) and the scoring cost."""
        if not self.rounds:
            return {}
        latest = self.rounds[max(self.rounds)]
        width = len(str(len(self.layout.layers) - 1))
        metrics = {f"freeze/score_layer_{index:0{width}d}": score for index, score in enumerate(latest["scores"])}
        metrics["freeze/probe_scoring_seconds"] = round(self.scoring_seconds, 6)
        return metrics

    @property
    def withholding(self) -> bool:
        """True while a probe runs whose optimizer steps are withheld (`freeze_probe_mode: measure`)."""
        return self.meter is not None and probe_mode(self.arguments) == "measure"

    def observe_gradients(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Before an optimizer step: the meter reads the final gradients while a probe runs, and, when the probe
        withholds the step, takes what the step would do (``optimizer``: the torch optimizer, unwrapped)."""
        if self.meter is not None:
            with self._timed():
                self.meter.observe_gradients()
                if self.withholding:
                    self.meter.withheld_step(optimizer)

    # -- state -------------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        meter = None
        if self.meter is not None:
            meter = {"round": self.meter_round, "start_step": self.meter_start_step, "state": self.meter.state_dict()}
        return {
            "score": self.score.name,
            "rounds": {str(index): dict(entry) for index, entry in self.rounds.items()},
            "meter": meter,
            "scoring_seconds": self.scoring_seconds,
            "probe_seconds": self.probe_seconds,
        }

    def load_state_dict(self, state: Dict[str, Any], before_step: Optional[int] = None) -> None:
        """Take over an interrupted run's rounds (those that ended by `before_step`, when it is given), and its probe
        in progress."""
        if before_step is None:
            before_step = float("inf")
        if state.get("score") not in (None, self.score.name):
            if is_main_process():
                logger.warning(
                    f"The checkpoint's layer scores are {state.get('score')!r}, this run's `freeze_score` is "
                    f"{self.score.name!r}: the scores are measured again."
                )
            return
        self.rounds = {
            int(index): dict(entry) for index, entry in (state.get("rounds") or {}).items() if entry["step"] <= before_step
        }
        self.scoring_seconds = float(state.get("scoring_seconds", 0.0))
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
        self.meter = self.meter_round = None
        meter = state.get("meter")
        if meter and meter["round"] not in self.rounds and meter["start_step"] <= before_step:
            self.meter = build_meter(self.score, self.layers, _SAMPLE_SEED)
            self.meter.load_state_dict(meter["state"])
            self.meter_round, self.meter_start_step = meter["round"], meter["start_step"]
            self._probe_began = time.perf_counter()

    def reset(self) -> None:
        """Forget every round: a second `train()` on the same model starts over."""
        self.rounds, self.meter, self.meter_round, self.last_selection = {}, None, None, None
        self.scoring_seconds = self.probe_seconds = 0.0

    # -- internals ---------------------------------------------------------------------------------------------------

    def _start(self, round_index: int, step: int) -> None:
        self.meter = build_meter(self.score, self.layers, _SAMPLE_SEED)
        self.meter_round, self.meter_start_step = round_index, step
        self._probe_began = time.perf_counter()
        with self._timed():
            self.meter.start()

    def _finish(self, round_index: int, progress: TrainingProgress) -> None:
        with self._timed():
            scores = list(broadcast_from_main([float(value) for value in self.meter.finish()]))
        if self._probe_began is not None:
            self.probe_seconds += time.perf_counter() - self._probe_began
        self.rounds[round_index] = {
            "step": int(progress.step),
            "probe_start_step": int(self.meter_start_step),
            "epoch": round(float(progress.epoch), 6),
            "scores": scores,
        }
        self.last_selection = dict(self.rounds[round_index], round=round_index)
        self.meter = self.meter_round = self._probe_began = None

    def _timed(self):
        return _Stopwatch(self, self.meter.device if self.meter is not None else torch.device("cpu"))

    def cost_line(self) -> str:
        spent = f"scoring took {self.scoring_seconds:.3f} s"
        if self.score.needs_probe and self.probe_seconds > 0:
            spent += f", {100 * self.scoring_seconds / self.probe_seconds:.2f}% of the probes' {self.probe_seconds:.2f} s"
        return spent


class _Stopwatch:
    """Adds the wall time of a block to the probe's scoring cost (synchronising the GPU so it is the real cost)."""

    def __init__(self, probe: LayerProbe, device: torch.device):
        self.probe, self.cuda = probe, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.began = time.perf_counter()

    def __exit__(self, *exc_info):
        if self.cuda:
            torch.cuda.synchronize()
        self.probe.scoring_seconds += time.perf_counter() - self.began
        return False
