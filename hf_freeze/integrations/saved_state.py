"""A saved freezing state, checked before anything is resumed from it: its shape (a damaged file is refused with the
entry at fault), and whether the optimizer state saved beside it belongs to this run's parameters."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from ..errors import FreezeConfigError, few

__all__ = ["check_registered", "check_shape"]


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
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise damaged(f"'timeline.{kind}[{index}]' has no integer 'step' (got {entry!r})")
    probe = state.get("probe") or {}
    if not isinstance(probe, dict):
        raise damaged("'probe' is not a mapping")
    for index, entry in (probe.get("rounds") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int) or not isinstance(entry.get("scores"), list):
            raise damaged(f"'probe.rounds[{index}]' lacks its 'step' or 'scores' (got {entry!r})")
    meter = probe.get("meter")
    if meter is not None and not (isinstance(meter, dict) and {"round", "start_step", "state"} <= set(meter)):
        raise damaged(f"'probe.meter' lacks 'round', 'start_step' or 'state' (got {meter!r})")
    registered = state.get("registered")
    if registered is not None and not (isinstance(registered, list) and all(isinstance(n, str) for n in registered)):
        raise damaged("'registered' is not a list of parameter names")


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

