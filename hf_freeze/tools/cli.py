"""The `hf-freeze` command: see a policy before training (`plan`), check a training YAML (`validate`), search
hyperparameters with frozen layers as the fidelity (`hpo`).

    hf-freeze plan path/to/model --strategy bottom --layers 0.5 --batch-size 8 --seq-len 2048 --precision bf16-mixed
    hf-freeze plan path/to/config.json --config configs/bottom.yaml
    hf-freeze validate configs/*.yaml [--model path/to/model] [--task sequence-classification]
    hf-freeze hpo train.yaml --space configs/search_spaces/hpo_space.yaml --trials 24
    hf-freeze expand path/to/model --num-new-blocks 8 path/to/expanded-model
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import FreezeConfigError

__all__ = ["main"]

# Markers in the Trainer's `optim` names -> `plan --optimizer`, so a training YAML describes the run to plan.
_OPTIMIZER_NAMES = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd", "8bit": "adamw-8bit"}


# The sub-commands and their line in `hf-freeze --help`: all the top-level parser knows, so that `hf-freeze --help`
# imports neither torch nor transformers. A sub-command's own parser is built only when it is the one chosen.
COMMANDS = {
    "plan": "show what a policy freezes, when, and the training memory it saves (no weights are loaded)",
    "validate": "check a training YAML and report every problem (exit status 1 if any)",
    "hpo": "search hyperparameters with the fraction of trainable layers as the fidelity (Optuna)",
    "expand": "add LLaMA Pro blocks (identity copies) to a model, for `freeze_strategy: llama_pro`",
}


def build_parser(command: Optional[str] = None) -> Tuple[argparse.ArgumentParser, Optional[argparse.ArgumentParser]]:
    """The `hf-freeze` parser, and the complete parser of ``command`` (None when it is not a sub-command's name:
    every sub-command then has its name and help line only)."""
    parser_class: type = argparse.ArgumentParser
    if command == "plan":
        from transformers import HfArgumentParser  # the freeze_* options come from the FreezeArguments dataclass

        parser_class = HfArgumentParser
    parser = argparse.ArgumentParser(prog="hf-freeze", description="Plan and check layer-freezing policies.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    chosen = None
    for name, help_line in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_line)
            continue
        chosen = _ADD_PARSER[name](commands, help=help_line, formatter_class=_DefaultsHelpFormatter)
    return parser, chosen


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, as HfArgumentParser does, except None: an unset `freeze_*` option means "the
    strategy's default", which its help text states ("default 2"); "(default: None)" after it would contradict it."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _add_plan_parser(commands, **kwargs) -> argparse.ArgumentParser:
    from ..config import FreezeArguments
    from .memory import OPTIMIZERS, PRECISIONS
    from .plan import TASKS

    plan = commands.add_parser(
        "plan",
        dataclass_types=FreezeArguments,
        description="Show the blocks a policy freezes, its timeline and an estimate of the training memory, "
        "from the model's config alone (the model is built on the meta device: no weights, no memory).",
        epilog="Every --freeze_* option also works without its prefix: --strategy bottom --layers 0.5.",
        **kwargs,
    )
    for action in plan._actions:
        if "--freeze_strategy" in action.option_strings:
            action.help = _strategy_help()
    plan.add_argument("model", help="a local model folder or a config.json")
    plan.add_argument("--config", help="a training YAML: its freeze_* keys give the policy (the command line wins), "
                      "and per_device_train_batch_size, max_steps, num_train_epochs, bf16/fp16, "
                      "gradient_checkpointing and optim set the options below")
    plan.add_argument("--task", default="auto", choices=["auto", *TASKS], help="which head to build")
    plan.add_argument("--num-labels", type=int, default=None, help="labels of a classification head")
    plan.add_argument("--batch-size", type=int, default=8, help="sequences per device and step")
    plan.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    plan.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                      help="; ".join(f"{name}: {item.description}" for name, item in PRECISIONS.items()))
    plan.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="sets the optimizer state size")
    plan.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                      help="where training runs: unset, `freeze_chunked_loss` is on on the CPU only (default cpu)")
    plan.add_argument("--gradient-checkpointing", action="store_true", help="keep only layer inputs, recompute")
    plan.add_argument("--max-steps", type=int, default=None, help="steps of the run (needed for a schedule's timeline)")
    plan.add_argument("--num-epochs", type=float, default=1.0, help="epochs over --max-steps, for epoch-based schedules")
    plan.add_argument("--seed", type=int, default=0, help="seed handed to policies that draw at random")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    return plan


def _strategy_help() -> str:
    """`--strategy`'s help: every registered strategy, from the registry, so that a new one is listed the day it
    is registered."""
    from ..policies import STRATEGIES

    groups = {"static": [], "schedule": [], "measured": []}
    for name in STRATEGIES:
        strategy = STRATEGIES.get(name)
        kind = "measured" if strategy.needs_scores else "schedule" if strategy.dynamic else "static"
        groups[kind].append(repr(name))
    return (
        f"Which layers to freeze. Static: {', '.join(groups['static'])}. Schedules (the frozen set changes during "
        f"training): {', '.join(groups['schedule'])}. Chosen from measurements: {', '.join(groups['measured'])}. "
        "The options each strategy reads are listed in docs/options.md."
    )


def _add_validate_parser(commands, **kwargs) -> argparse.ArgumentParser:
    from .plan import TASKS

    validate = commands.add_parser(
        "validate",
        description="Parse YAML files as HfArgumentParser(FreezeTrainingArguments) would for training, and report "
        "every problem of each: unknown keys, values of the wrong type, each bad freeze_* value with what is valid. "
        "The exit status is 1 if any file has a problem.",
        **kwargs,
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="the YAML files (e.g. configs/*.yaml)")
    validate.add_argument("--model", default=None, help="also check the values that depend on this model "
                          "(a local folder or config.json, built on the meta device as the class --task names)")
    validate.add_argument("--task", default="auto", choices=["auto", *TASKS], help="which head to build for --model")
    validate.add_argument("--arguments-from", default=None, metavar="SCRIPT[:Class,...]",
                          help="a training script (file or module) whose own argument dataclasses the YAML also "
                          "fills, e.g. examples/run_classification.py")
    return validate


def _add_hpo_parser(commands, **kwargs) -> argparse.ArgumentParser:
    from . import hpo

    return hpo.add_parser(commands, **kwargs)


def _add_expand_parser(commands, **kwargs) -> argparse.ArgumentParser:
    expand = commands.add_parser(
        "expand",
        description="LLaMA Pro's block expansion, as LLaMA-Factory's scripts/llama_pro.py writes it: the layers are "
        "split into N equal groups, and after the last layer of each a copy of it is inserted with its o_proj and "
        "down_proj weights set to zero, so that each new block starts as the identity and the expanded model "
        "computes what the original did. Train the new blocks with `freeze_strategy: llama_pro` and "
        "`freeze_num_new_blocks: N`.",
        **kwargs,
    )
    expand.add_argument("model_dir", metavar="MODEL_DIR", help="a local model folder (config.json and weights)")
    expand.add_argument("output_dir", metavar="OUTPUT_DIR", help="a new or empty folder for the expanded model")
    expand.add_argument("--num-new-blocks", type=int, required=True, help="blocks to add; must divide the layers")
    expand.add_argument("--max-shard-size", default="5GB", help="largest weight file (an index is written if split)")
    return expand


_ADD_PARSER = {
    "plan": _add_plan_parser, "validate": _add_validate_parser, "hpo": _add_hpo_parser, "expand": _add_expand_parser,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, command_parser = build_parser(argv[0] if argv else None)
    try:
        if argv[:1] == ["plan"]:
            argv = _expand_short_freeze_options(argv, command_parser)
            _defaults_from_config_file(argv, command_parser)
        namespace = parser.parse_args(argv)
        if namespace.command == "plan":
            return _plan(namespace)
        if namespace.command == "hpo":
            return namespace.hpo_main(namespace)
        if namespace.command == "expand":
            return _expand(namespace)
        return _validate(namespace)
    except FreezeConfigError as error:
        from .validate import did_you_mean

        suggestion = did_you_mean(error)
        print(f"hf-freeze: error: {error.sentence + suggestion if suggestion else error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------------------
# plan


def _expand_short_freeze_options(argv: List[str], plan_parser) -> List[str]:
    """``--strategy`` -> ``--freeze_strategy``: every freeze_* field, without its prefix."""
    from ..config import freeze_fields

    own = {option for action in plan_parser._actions for option in action.option_strings}
    fields = set(freeze_fields())
    expanded = []
    for token in argv:
        option, equals, value = token.partition("=")
        name = "freeze_" + option[2:].replace("-", "_") if option.startswith("--") else ""
        if name in fields and option not in own:
            token = f"--{name}" + (equals + value if equals else "")
        expanded.append(token)
    return expanded


def _defaults_from_config_file(argv: List[str], plan_parser) -> None:
    from ..config import load_config_file, raise_if_unknown

    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    known, _ = finder.parse_known_args(argv[1:])
    if not known.config:
        return
    values = load_config_file(known.config)
    freeze_values = {key: value for key, value in values.items() if key.startswith("freeze_")}
    raise_if_unknown(freeze_values)
    defaults: Dict[str, Any] = dict(freeze_values)
    if isinstance(values.get("per_device_train_batch_size"), int):
        defaults["batch_size"] = values["per_device_train_batch_size"]
    if isinstance(values.get("max_steps"), int) and values["max_steps"] > 0:
        defaults["max_steps"] = values["max_steps"]
    if isinstance(values.get("num_train_epochs"), (int, float)):
        defaults["num_epochs"] = float(values["num_train_epochs"])
    if isinstance(values.get("seed"), int):
        defaults["seed"] = values["seed"]
    for flag, precision in (("bf16", "bf16-mixed"), ("fp16", "fp16-mixed")):
        if values.get(flag) is True:
            defaults["precision"] = precision
    if values.get("gradient_checkpointing") is True:
        defaults["gradient_checkpointing"] = True
    optim = str(values.get("optim", ""))
    for marker, optimizer in _OPTIMIZER_NAMES.items():
        if marker in optim:
            defaults["optimizer"] = optimizer
    plan_parser.set_defaults(**defaults)


def _plan(namespace) -> int:
    from ..config import FreezeArguments, freeze_fields
    from .plan import find_model_config, make_plan
    from .plan_report import format_plan, plan_as_dict

    arguments = FreezeArguments(**{name: getattr(namespace, name) for name in freeze_fields()})
    source = find_model_config(namespace.model)  # a folder whose one sub-folder holds the model is accepted
    model = _meta_model(source, namespace.task, namespace.num_labels)
    plan = make_plan(
        model, arguments, batch_size=namespace.batch_size, sequence_length=namespace.seq_len,
        precision=namespace.precision, optimizer=namespace.optimizer, device=namespace.device,
        gradient_checkpointing=namespace.gradient_checkpointing, max_steps=namespace.max_steps,
        num_epochs=namespace.num_epochs, seed=namespace.seed,
    )
    if namespace.json:
        print(json.dumps(plan_as_dict(plan, source), indent=2))
    else:
        print(format_plan(plan, source))
    return 0


def _meta_model(path: str, task: str, num_labels: Optional[int] = None):
    from .plan import load_model_on_meta

    try:
        return load_model_on_meta(path, task, num_labels)
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, FreezeConfigError):
            raise
        raise FreezeConfigError(f"Could not build a model from {path!r} (task {task!r}): {error}") from None


def _expand(namespace) -> int:
    from .expand import expand_model, format_result

    result = expand_model(
        namespace.model_dir, namespace.num_new_blocks, namespace.output_dir, max_shard_size=namespace.max_shard_size
    )
    print(format_result(result, namespace.output_dir))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# validate


def _validate(namespace) -> int:
    from .validate import check_config_file

    dataclass_types = _dataclass_types(namespace.arguments_from)
    model = _meta_model(namespace.model, namespace.task) if namespace.model else None
    against = f", against {namespace.model} built as {type(model).__name__}" if model is not None else ""
    names = ", ".join(dtype.__name__ for dtype in dataclass_types)
    failed = 0
    for path in namespace.files:
        problems = check_config_file(path, dataclass_types, model)
        if not problems:
            print(f"{path}: OK (as {names}{against})")
            continue
        failed += 1
        print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} (as {names}{against}):")
        for problem in problems:
            print(f"  - {problem}")
        if model is not None:
            hint = _other_task_hint(path, dataclass_types, namespace.model, type(model), problems)
            if hint:
                print(f"  hint: {hint}")
    if len(namespace.files) > 1:
        print(f"{len(namespace.files) - failed} of {len(namespace.files)} files OK")
    return 1 if failed else 0


def _other_task_hint(path: str, dataclass_types, model_path: str, built: type, problems) -> Optional[str]:
    """When the problems found against the model ``--task`` built are gone against another task's model (a
    pattern written for `BertForSequenceClassification`'s names, ``bert.encoder...``, checked against the bare
    `BertModel` that a sentence-embedding checkpoint's config names), the ``--task`` that fixes them."""
    from transformers.utils import logging as transformers_logging

    from .plan import TASKS, load_model_on_meta
    from .validate import check_config_file

    found = {str(problem) for problem in problems}
    if found == {str(problem) for problem in check_config_file(path, dataclass_types)}:
        return None  # no problem depends on the model
    better = []
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # building a head the user did not ask for may warn about its config
    try:
        for task in TASKS:
            try:
                candidate = load_model_on_meta(model_path, task)
            except (OSError, ValueError, KeyError):
                continue  # no such head for this architecture
            if type(candidate) is built:
                continue
            left = {str(problem) for problem in check_config_file(path, dataclass_types, candidate)}
            if left < found:
                better.append(f"--task {task} ({type(candidate).__name__})")
    finally:
        transformers_logging.set_verbosity(verbosity)
    if not better:
        return None
    return (
        f"the model was built as {built.__name__}, whose parameter names differ from a task model's: with "
        f"{', '.join(better)}, {'these problems are' if len(problems) > 1 else 'the problem is'} gone "
        "(fewer or none left); add the --task of the model you train"
    )


def _dataclass_types(source: Optional[str]) -> List[type]:
    """FreezeTrainingArguments, plus the argument dataclasses a training script defines."""
    from ..config import FreezeTrainingArguments

    if not source:
        return [FreezeTrainingArguments]
    target, _, class_names = source.partition(":")
    module = _import_script(target)
    if class_names:
        try:
            found = [getattr(module, name.strip()) for name in class_names.split(",")]
        except AttributeError as error:
            raise FreezeConfigError(f"--arguments-from {source!r}: {error}") from None
    else:
        found = [
            value for value in vars(module).values()
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
        ]
    from transformers import TrainingArguments

    if not any(issubclass(dtype, TrainingArguments) for dtype in found):
        found.append(FreezeTrainingArguments)
    return found


def _import_script(target: str):
    if target.endswith(".py") or os.path.sep in target:
        if not os.path.isfile(target):
            raise FreezeConfigError(f"--arguments-from: {target!r} is not a file.")
        folder = os.path.dirname(os.path.abspath(target))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the script's sibling modules
        name = "_hf_freeze_script_" + os.path.splitext(os.path.basename(target))[0]
        spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as error:
        raise FreezeConfigError(f"--arguments-from: cannot import {target!r} ({error}).") from None


if __name__ == "__main__":
    sys.exit(main())
