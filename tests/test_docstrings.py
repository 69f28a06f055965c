"""Every docstring example in the package runs and prints what it says.

They run in a child process: some examples register a strategy or a score, which must not leak into the registries
the other tests read.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

RUNNER = textwrap.dedent(
    """
    import doctest, importlib, pkgutil, sys
    import hf_freeze
    try:  # DeepSpeed prints its accelerator choice at its first import (accelerate's unwrapping imports it): not in an example
        import deepspeed
    except Exception:
        pass

    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    finder = doctest.DocTestFinder()
    seen = 0
    for info in pkgutil.walk_packages(hf_freeze.__path__, "hf_freeze."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for test in finder.find(module):
            if test.docstring is None or ">>>" not in test.docstring:
                continue
            # Hugging Face style wraps examples in ``` fences; doctest would read the closing fence as output.
            text = "\\n".join(line for line in test.docstring.splitlines() if not line.strip().startswith("```"))
            runner.run(parser.get_doctest(text, dict(test.globs), test.name, None, 0))
            seen += 1
    print(f"examples: {seen}, failed: {runner.failures}")
    sys.exit(1 if runner.failures else 0)
    """
)


def test_every_docstring_example_runs(tmp_path):
    # Examples that build a Trainer write into "out": run them in a private folder.
    # The copy of hf_freeze under test (this checkout), whatever copy is installed.
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert int(result.stdout.split("examples: ")[1].split(",")[0]) >= 30
