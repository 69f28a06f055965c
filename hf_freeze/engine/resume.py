"""A saved freezing state, checked before anything is resumed from it: its shape (a damaged file is refused with the
entry at fault), and whether the optimizer state saved beside it belongs to this run's parameters."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..errors import FreezeConfigError, few
from ..logs import get_logger
from ..processes import is_main_process

logger = get_logger(__name__)

__all__ = ["ResumableFreezer", "check_groups", "check_registered", "check_rows", "check_shape"]


def check_shape(state: Any, source: str) -> None:
    """Refuse a state that `LayerFreezer.state_dict` cannot have written, naming where it comes from and the entry."""

    def damaged(what: str) -> FreezeConfigError:
        return FreezeConfigError(
            f"The freezing state in {source} is damaged: {what}. Restore the file, or resume without it (delete the "
            "entry to start the freezing state fresh)."
        )

    if not isinstance(state, dict):
        raise damaged(f"it is a {type(state).__name__}, not a mapping")
    timeline = state.get("timeline") or {}
    if not isinstance(timeline, dict):
        raise damaged("'timeline' is not a mapping")
    for kind in ("changes", "selections"):
        entries = timeline.get(kind) or []
        if not isinstance(entries, list):
            raise damaged(f"'timeline.{kind}' is not a list")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not _is_step(entry.get("step")):
                raise damaged(f"'timeline.{kind}[{index}]' has no integer 'step' (a whole number >= 0; got {entry!r})")
    probe = state.get("probe") or {}
    if not isinstance(probe, dict):
        raise damaged("'probe' is not a mapping")
    rounds = probe.get("rounds") or {}
    if not isinstance(rounds, dict):
        raise damaged(f"'probe.rounds' is not a mapping of round: entry (got a {type(rounds).__name__})")
    for index, entry in rounds.items():
        if not isinstance(entry, dict) or not _is_step(entry.get("step")) or not isinstance(entry.get("scores"), list):
            raise damaged(f"'probe.rounds[{index}]' lacks its 'step' or 'scores' (got {entry!r})")
    meter = probe.get("meter")
    if meter is not None and not (isinstance(meter, dict) and {"round", "start_step", "state"} <= set(meter)):
        raise damaged(f"'probe.meter' lacks 'round', 'start_step' or 'state' (got {meter!r})")
    registered = state.get("registered")
    if registered is not None and not (isinstance(registered, list) and all(isinstance(n, str) for n in registered)):
        raise damaged("'registered' is not a list of parameter names")
    groups = state.get("groups")
    if groups is not None and not (isinstance(groups, dict) and all(isinstance(g, dict) for g in groups.values())):
        raise damaged("'groups' is not a mapping of learning-rate group: its rate and parameters")


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_registered(
    saved: Optional[Sequence[str]], current: Sequence[str], saved_options: Dict[str, Any], options: Dict[str, Any]
) -> None:
    """Refuse to resume when the optimizer was built over other parameters than this run's.

    An optimizer's saved state is matched to parameters by position: with another set of registered parameters,
    one parameter's Adam moments would land on another, or torch refuses the groups with a message that names no
    policy. A change that keeps the set (another LISA period, another learning-rate factor) is allowed.
    """
    if saved is None or list(saved) == list(current):
        return
    gone, new = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    detail = "; ".join(
        part for part in (
            f"only the checkpoint's: {few(gone)}" if gone else "", f"only this run's: {few(new)}" if new else "",
        ) if part
    ) or "the same parameters in another order"
    raise FreezeConfigError(
        f"Cannot resume: the checkpoint's optimizer was built over other parameters than this run's ({detail}), so "
        f"its state would be loaded into the wrong parameters. The checkpoint was trained with {_policy(saved_options)}, "
        f"this run uses {_policy(options)}. Resume with the checkpoint's policy, or start a new run from the "
        "checkpoint's weights without its optimizer state.",
        fields=sorted({key for key in set(saved_options or {}) | set(options) if (saved_options or {}).get(key) != options.get(key)}),
    )


def _policy(options: Optional[Dict[str, Any]]) -> str:
    set_options = {key: value for key, value in sorted((options or {}).items(), key=lambda item: item[0] != "freeze_strategy")
                   if value is not None}
    return "{" + ", ".join(f"{key}: {value!r}" for key, value in set_options.items()) + "}" if set_options else "no policy"



def check_rows(saved: Mapping[str, Sequence[int]], current: Mapping[str, Sequence[int]], source: str) -> None:
    """Refuse to resume when the checkpoint trained other rows (`freeze_trainable_tokens`, `freeze_trainable_experts`)
    than this run would: the optimizer state of the rows would land on other rows."""
    saved = {name: list(indices) for name, indices in saved.items()}
    current = {name: list(indices) for name, indices in current.items()}
    if saved == current:
        return
    differ = _differing_keys(saved, current)
    raise FreezeConfigError(
        f"Cannot resume: {source} trained other rows of {', '.join(differ)} than this run would "
        f"(the checkpoint's: {_rows_text(saved, differ)}; this run's: {_rows_text(current, differ)}), so "
        "the optimizer state of the rows would land on other rows. Give `freeze_trainable_tokens` / "
        "`freeze_trainable_experts` the checkpoint's rows.",
        fields=["freeze_trainable_tokens", "freeze_trainable_experts"],
    )


def check_groups(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]], source: str) -> None:
    """Refuse to resume when the checkpoint's optimizer held other learning-rate groups, or other rates, than this run
    builds: torch loads a saved optimizer state group by group (its rates included), so the rates and moments would
    land on other parameters, or the checkpoint's rates would silently replace the ones asked for now."""
    saved, current = dict(saved or {}), dict(current or {})
    if saved == current:
        return
    differ = _differing_keys(saved, current)
    raise FreezeConfigError(
        f"Cannot resume: {source} was trained with other learning-rate groups or rates than this run's (they differ "
        f"in {few(differ)}; the checkpoint's groups: {few(sorted(saved)) or 'none'}; this run's: "
        f"{few(sorted(current)) or 'none'}), and the optimizer state it holds would put its own rates and moments on "
        "these groups. Resume with the checkpoint's `freeze_learning_rates` and `freeze_layer_lr_decay`, or start a "
        "new run from its weights.",
        fields=["freeze_learning_rates", "freeze_layer_lr_decay"],
    )


def _differing_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """The keys whose entries differ between two saved mappings (an entry missing on one side differs)."""
    return sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))


def _rows_text(rows: Dict[str, List[int]], names: List[str]) -> str:
    return "; ".join(f"{name} {few([str(r) for r in rows[name]], 5) if name in rows else 'none'}" for name in names)


class ResumableFreezer:
    """The part of `LayerFreezer` that survives a restart: its JSON-safe state, the checks that refuse a state this
    run cannot resume, and taking a saved state over. (The freezer's attributes it reads: ``arguments``, ``layout``,
    ``applier``, ``registered``, ``timeline``, ``probe``, and its `restart` and `group_layout`.)"""

    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state: the options, the timeline so far, an adaptive policy's scores and probe in progress.

        The frozen set itself is not saved: it is a function of the step (and of the saved scores), recomputed by
        the next `update`.
        """
        rows = self.applier.rows.selection()
        groups = self.group_layout()
        return {
            "options": self.arguments.freeze_options(),
            "registered": self.registered,
            **({"groups": groups} if groups else {}),
            **({"rows": {"base_vocabulary": self.layout.base_vocabulary, "selection": {k: list(v) for k, v in rows.items()}}}
               if rows else {}),
            "timeline": self.timeline.state_dict() if self.timeline is not None else None,
            "probe": self.probe.state_dict() if self.probe is not None else None,
        }

    def check_resumable(self, state: Dict[str, Any], source: str = "the saved state") -> None:
        """Refuse, before any optimizer state is loaded, a saved state that is damaged or whose optimizer was built
        over other parameters than this run's (a policy changed between the runs). Call it after `prepare`."""
        check_shape(state, source)
        if self.registered is not None:
            check_rows((state.get("rows") or {}).get("selection") or {}, self.applier.rows.selection(), source)
            check_registered(state.get("registered"), self.registered, state.get("options"), self.arguments.freeze_options())
            check_groups(state.get("groups"), self.group_layout(), source)

    def take_over_frozen_set(self, state: Dict[str, Any], progress: Any) -> None:
        """Apply the frozen set the saved run had at ``progress`` now, before the engine wraps the model and loads
        the optimizer state: FSDP2 loads it through torch's distributed checkpoint, which requires a saved state for
        every parameter that requires grad, and the saved run had released the state of what was frozen then.
        `start` takes the state over again (and applies the same frozen set) when training begins."""
        self.load_state_dict(state, step=progress.step)
        self.applier.apply(self.decide(progress))

    def load_state_dict(self, state: Dict[str, Any], step: Optional[int] = None) -> None:
        """Take over the state of an interrupted run; the next `update` applies the frozen set in full.

        Load it before the optimizer's state: it refuses an optimizer state that belongs to other parameters.

        Args:
            state: What `state_dict` returned.
            step: Where the resumed run starts; records made at or after it are dropped. Default: keep them all.
        """
        self.check_resumable(state)
        if state.get("options") not in (None, self.arguments.freeze_options()) and is_main_process():
            logger.warning(
                "The freezing policy differs from the one in the saved state; the frozen set follows the current "
                "policy" + (f" from step {step} on." if step is not None else ".")
            )
        self.restart()
        if self.timeline is not None and state.get("timeline"):
            self.timeline.load_state_dict(state["timeline"], step)
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"], step)
