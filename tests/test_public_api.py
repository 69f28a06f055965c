"""The public API: a sorted `__all__`, and a runnable example in the docstring of every public class."""

import doctest
import inspect

import hf_freeze


def test_all_is_sorted_and_importable():
    assert hf_freeze.__all__ == sorted(hf_freeze.__all__)
    for name in hf_freeze.__all__:
        assert hasattr(hf_freeze, name), name


def test_every_public_class_has_a_runnable_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that build a Trainer write into "out"
    classes = [getattr(hf_freeze, name) for name in hf_freeze.__all__ if inspect.isclass(getattr(hf_freeze, name))]
    missing = [cls.__name__ for cls in classes if ">>>" not in (cls.__doc__ or "") and not issubclass(cls, Exception)]
    assert not missing, f"public classes without an example: {missing}"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for cls in classes:
        # Hugging Face style wraps examples in ``` fences; doctest would read the closing fence as output.
        text = "\n".join(line for line in (cls.__doc__ or "").splitlines() if not line.strip().startswith("```"))
        result = runner.run(parser.get_doctest(text, {}, cls.__name__, None, 0))
        assert result.failed == 0, f"{cls.__name__} docstring example failed"
