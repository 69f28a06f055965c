"""hf_freeze: freeze model layers by policy in the Hugging Face Trainer.

The flow is model → blocks (`hf_freeze.model`) → decision (`hf_freeze.policies`, with scores measured by
`hf_freeze.scores`) → application (`hf_freeze.apply`) → report (`hf_freeze.report`); `hf_freeze.integrations` plugs
it into a loop: `FreezeCallback` for the Trainer, `LayerFreezer` for any other. The options are `FreezeArguments`
(`hf_freeze.config`); `hf_freeze.tools` holds the `hf-freeze` command.

Exported here: what a user needs, and the extension points for a new strategy (`Strategy`, `register_strategy`) or
a new adaptive score (`Score`, `ScoreMeter`, `register_score`). Everything else stays importable from its module.
"""

import importlib

# Every export is imported from its module on first access (PEP 562): `import hf_freeze` (and so the `hf-freeze`
# command) imports neither torch nor transformers until a name that needs them is used.
_EXPORTS = {
    "Block": ".model",
    "FreezeArguments": ".config",
    "FreezeCallback": ".integrations",
    "FreezeConfigError": ".errors",
    "FreezeDecision": ".policies",
    "FreezeTrainingArguments": ".config",
    "LayerDiscoveryError": ".errors",
    "LayerFreezer": ".engine",
    "ModelLayout": ".model",
    "SCORES": ".policies",
    "STRATEGIES": ".policies",
    "Score": ".policies",
    "ScoreMeter": ".scores",
    "Strategy": ".policies",
    "TrainingProgress": ".policies",
    "decide": ".policies",
    "discover_layout": ".model",
    "reference_model": ".reference",
    "register_score": ".policies",
    "register_strategy": ".policies",
}
_STAGES = ("apply", "config", "integrations", "model", "policies", "report", "scores", "tools")

__version__ = "0.1.0"

__all__ = [
    "Block",
    "FreezeArguments",
    "FreezeCallback",
    "FreezeConfigError",
    "FreezeDecision",
    "FreezeTrainingArguments",
    "LayerDiscoveryError",
    "LayerFreezer",
    "ModelLayout",
    "SCORES",
    "STRATEGIES",
    "Score",
    "ScoreMeter",
    "Strategy",
    "TrainingProgress",
    "decide",
    "discover_layout",
    "reference_model",
    "register_score",
    "register_strategy",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _STAGES:  # `hf_freeze.config` without importing it first, as when every stage was imported here
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
