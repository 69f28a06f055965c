"""The public API: a sorted `__all__` of the user API and the extension points, each with a runnable example."""

import inspect

import hf_freeze

# What a user of the library reaches for, and what a plugin author needs to add a strategy or a score.
USER_API = {
    "FreezeArguments", "FreezeCallback", "FreezeConfigError", "FreezeTrainingArguments", "LayerDiscoveryError",
    "LayerFreezer", "Block", "ModelLayout", "TrainingProgress", "FreezeDecision", "decide", "discover_layout", "reference_model",
}
EXTENSION_POINTS = {"STRATEGIES", "Strategy", "register_strategy", "SCORES", "Score", "ScoreMeter", "register_score"}


def test_all_is_sorted_and_importable():
    assert hf_freeze.__all__ == sorted(hf_freeze.__all__)
    for name in hf_freeze.__all__:
        assert hasattr(hf_freeze, name), name


def test_exports_are_the_user_api_and_the_extension_points_only():
    assert set(hf_freeze.__all__) == USER_API | EXTENSION_POINTS


def test_every_exported_class_and_function_has_an_example():
    """The examples themselves run in tests/test_docstrings.py, with every other docstring example."""
    exported = [getattr(hf_freeze, name) for name in hf_freeze.__all__]
    documented = [obj for obj in exported if inspect.isclass(obj) or inspect.isfunction(obj)]
    missing = [
        obj.__name__ for obj in documented
        if ">>>" not in (obj.__doc__ or "") and not (inspect.isclass(obj) and issubclass(obj, Exception) and obj is not hf_freeze.FreezeConfigError)
    ]
    assert not missing, f"public classes and functions without an example: {missing}"
