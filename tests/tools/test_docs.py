"""The option reference page (docs/options.md) is generated from the dataclass help text and must match it."""

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

from hf_freeze import FreezeArguments
from hf_freeze.config import freeze_fields
from hf_freeze.tools.docs import default_page, main, render_options, render_strategies, update_page
from hf_freeze.policies import STRATEGIES

PAGE = Path(__file__).resolve().parents[2] / "docs" / "options.md"


def test_the_options_page_matches_the_code():
    assert default_page() == str(PAGE)  # what `python -m hf_freeze.tools.docs` rewrites without arguments
    assert update_page(str(PAGE), check=True), "docs/options.md is out of date: run `python -m hf_freeze.tools.docs`"


def test_every_field_and_strategy_is_documented_with_its_help_text():
    options = render_options()
    for item in dataclasses.fields(FreezeArguments):
        assert f"`{item.name}`" in options
        assert " ".join(item.metadata["help"].split()).replace("|", "\\|") in options
    assert len(options.splitlines()) == 2 + len(freeze_fields())
    strategies = render_strategies()
    for name in STRATEGIES.names():
        assert f"| `{name}` |" in strategies


def test_a_changed_help_text_or_new_field_is_detected(tmp_path):
    @dataclasses.dataclass
    class Extended(FreezeArguments):
        freeze_new_option: Optional[int] = dataclasses.field(default=None, metadata={"help": "A brand new option."})

    assert "| `freeze_new_option` | integer | unset | A brand new option. |" in render_options(Extended)

    stale = tmp_path / "options.md"
    shutil.copy(PAGE, stale)
    text = stale.read_text()
    help_text = " ".join(dataclasses.fields(FreezeArguments)[0].metadata["help"].split())
    stale.write_text(text.replace(help_text, "Outdated words."))
    assert not update_page(str(stale), check=True)
    assert main([str(stale), "--check"]) == 1
    assert main([str(stale)]) == 0  # regenerates
    assert stale.read_text() == text
