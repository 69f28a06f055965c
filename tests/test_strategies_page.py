"""docs/strategies.md: every static strategy has a section whose YAML and Python snippets say the same thing and
apply to a real model (a tiny Llama: the page's patterns name a Llama's parameters)."""

from pathlib import Path

import pytest
import yaml

import hf_freeze
import tiny
from hf_freeze import STRATEGIES, FreezeCallback, LayerFreezer

PAGE = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"


def _sections():
    sections = {}
    for part in PAGE.read_text().split("\n### ")[1:]:
        name = part.split("`")[1]
        sections[name] = (part.split("```yaml\n")[1].split("```")[0], part.split("```python\n")[1].split("```")[0])
    return sections


SECTIONS = _sections()


def test_every_static_strategy_has_a_section():
    static = {name for name in STRATEGIES.names() if not STRATEGIES.get(name).dynamic}
    assert set(SECTIONS) == static - {"llama_pro"}  # LLaMA Pro needs an expanded model: its own page


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_the_yaml_and_python_snippets_agree_and_apply(monkeypatch, name):
    yaml_text, python_text = SECTIONS[name]
    options = yaml.safe_load(yaml_text)
    assert options["freeze_strategy"] == name
    given = []
    monkeypatch.setattr(hf_freeze, "FreezeCallback", lambda **kwargs: given.append(kwargs))
    exec(python_text, {})  # the snippet's `from hf_freeze import FreezeCallback` gets the recorder
    assert given == [options]
    FreezeCallback(**options)  # accepted as it is
    model = tiny.build("bert" if name == "bitfit" else "llama")  # a Llama has no bias to train, and is refused
    LayerFreezer(model, **options).apply()
    frozen = [parameter_name for parameter_name, p in model.named_parameters() if not p.requires_grad]
    assert bool(frozen) is (name != "none"), frozen
