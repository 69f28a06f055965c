"""One vocabulary: each set of choices is declared once (a `Literal` annotation reading a constant of the policies, or
a registry), and every reader agrees with the declaration: the validator, `--help` (argparse's choices), the option
page (docs/options.md), and `hf-freeze validate`'s suggestions. A new choice field is covered here the day it lands."""

import dataclasses
import difflib

import pytest
from transformers import HfArgumentParser

from hf_freeze import SCORES, STRATEGIES, FreezeArguments, FreezeConfigError
from hf_freeze.config import freeze_fields
from hf_freeze.config.types import check_field, choices, field_hints
from hf_freeze.errors import one_of
from hf_freeze.policies.adaptive import PROBE_MODES, SELECT_ENDS
from hf_freeze.policies.common import CACHE_DTYPES, FROZEN_DTYPES
from hf_freeze.policies.core import HEALTH_CHECK_MODES, NON_LAYER_OPTIONS, common_options
from hf_freeze.policies.name_patterns import PATTERN_SYNTAXES
from hf_freeze.policies.parts import LAYER_STACKS, MOE_OPTIONS, PART_OPTIONS
from hf_freeze.policies.progress import SCHEDULE_UNITS
from hf_freeze.policies.rotation import BLOCK_ORDERS
from hf_freeze.policies.row_selection import ROW_OPTIONS
from hf_freeze.policies.schedules import GRANULARITIES
from hf_freeze.tools.docs import render_options
from hf_freeze.tools.validate import check_config

HINTS = field_hints(FreezeArguments)
CHOICE_FIELDS = [name for name in freeze_fields() if choices(HINTS[name])]
HELP = {item.name: item.metadata["help"] for item in dataclasses.fields(FreezeArguments)}


def _near_miss(word: str) -> str:
    return word[:-1] + ("x" if word[-1] != "x" else "y")


def test_each_choice_field_reads_the_constant_its_implementation_defines():
    declared = {
        "freeze_pattern_syntax": PATTERN_SYNTAXES, "freeze_health_check": HEALTH_CHECK_MODES,
        "freeze_cache_dtype": CACHE_DTYPES, "freeze_layer_stack": LAYER_STACKS, "freeze_schedule_unit": SCHEDULE_UNITS,
        "freeze_granularity": GRANULARITIES, "freeze_block_order": BLOCK_ORDERS, "freeze_select": SELECT_ENDS,
        "freeze_frozen_dtype": FROZEN_DTYPES, "freeze_probe_mode": PROBE_MODES,
    }
    assert set(CHOICE_FIELDS) == set(declared)
    for name, constant in declared.items():
        assert tuple(choices(HINTS[name])) == constant, name


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_help_and_the_option_page_and_argparse_read_the_declaration(name):
    allowed = choices(HINTS[name])
    parser = HfArgumentParser(FreezeArguments)
    (action,) = [action for action in parser._actions if f"--{name}" in action.option_strings]
    assert tuple(action.choices) == tuple(allowed)  # `--help` shows {a,b}; a bad command-line value is refused
    row = next(line for line in render_options().splitlines() if line.startswith(f"| `{name}` |"))
    assert f"| {one_of(allowed)} |" in row
    for value in allowed:  # the help text says what each choice does
        assert repr(value) in HELP[name], (name, value)


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_the_validator_and_validate_name_the_declared_choices(name):
    allowed = choices(HINTS[name])
    assert all(check_field(name, HINTS[name], value) == value for value in allowed)
    wrong = _near_miss(allowed[0])
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(**{name: wrong})
    assert error.value.fields == (name,) and error.value.options == tuple(allowed)
    assert f"`{name}` must be {one_of(allowed)} (got {wrong!r})" in str(error.value)
    suggestion = difflib.get_close_matches(wrong, allowed, n=1)[0]
    assert any(f"did you mean {suggestion!r}" in str(problem) for problem in check_config({name: wrong}))


def _built_in(entry) -> bool:
    target = getattr(entry, "select", None) or entry.meter
    return (target if isinstance(target, str) else target.__module__).startswith("hf_freeze.")


@pytest.mark.parametrize("field, registry", [("freeze_strategy", STRATEGIES), ("freeze_score", SCORES)])
def test_registry_fields_list_the_registry(field, registry):
    built_in = [name for name in registry.names() if _built_in(registry.get(name))]
    positions = [HELP[field].index(repr(name)) for name in built_in]
    assert positions == sorted(positions), "the help lists them in registration order"
    wrong = _near_miss(built_in[-1])
    options = {"freeze_strategy": "adaptive", "freeze_layers": 1} if field == "freeze_score" else {}
    with pytest.raises(FreezeConfigError) as error:
        FreezeArguments(**{**options, field: wrong})
    assert error.value.options == tuple(registry.names())
    problems = check_config({**options, field: wrong})
    assert any(f"did you mean {built_in[-1]!r}" in str(problem) for problem in problems)


def test_an_option_is_common_exactly_when_no_strategy_names_it():
    fields = freeze_fields()
    common = set(common_options(fields))
    owned = {option for name in STRATEGIES for option in STRATEGIES.get(name).options}
    assert common | owned == set(fields) and not common & owned
    # What the policies settle outside the strategies is common to all of them.
    aliases = {alias for alias, _, _ in PART_OPTIONS.values()}
    assert {"freeze_strategy", *NON_LAYER_OPTIONS, *PART_OPTIONS, *aliases, *MOE_OPTIONS, *ROW_OPTIONS} <= common
    assert {"freeze_cache_prefix", "freeze_health_check", "freeze_layer_paths", "freeze_component_paths"} <= common
