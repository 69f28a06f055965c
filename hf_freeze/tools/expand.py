"""`hf-freeze expand`: LLaMA Pro's block expansion, as LLaMA-Factory's `scripts/llama_pro.py` writes it.

The model's L layers are split into N groups of k = L / N consecutive layers; after the last layer of each group a
copy of it is inserted, with its attention output projection (`o_proj`) and its MLP output projection (`down_proj`)
set to zero. A pre-norm residual block whose two output projections are zero adds nothing to its input, so every new
block starts as the identity and the expanded model computes exactly what the original did. Training the new blocks
only (`freeze_strategy: llama_pro`) then adds knowledge without touching the original weights (LLaMA Pro: Progressive
LLaMA with Block Expansion).

The work is done on the checkpoint files, tensor by tensor, with the names as they are stored: no model is built,
so any architecture whose layers have `o_proj` and `down_proj` weights expands, with its dtype kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import invalid

__all__ = ["ExpansionResult", "expand_model", "format_result"]

CONFIG_NAME = "config.json"
# The projections LLaMA-Factory zeroes (matched as text inside the parameter name, as there): the two that write
# into the residual stream.
ZEROED = ("o_proj", "down_proj")
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
# The first '.<number>.' in a name: what precedes it is the layer container ("model.layers").
_LAYER_KEY = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass
class ExpansionResult:
    """What `expand_model` wrote.

    Example:

    ```python
    >>> from hf_freeze.tools.expand import ExpansionResult
    >>> ExpansionResult(num_layers=4, num_new_blocks=2, new_layers=[2, 5]).num_expanded_layers
    6
    ```
    """

    num_layers: int
    num_new_blocks: int
    new_layers: List[int]
    layer_container: str = ""
    weight_files: List[str] = field(default_factory=list)
    copied_files: List[str] = field(default_factory=list)
    not_copied: List[str] = field(default_factory=list)
    extended_config_lists: List[str] = field(default_factory=list)

    @property
    def num_expanded_layers(self) -> int:
        return self.num_layers + self.num_new_blocks


def expand_model(model_dir: str, num_new_blocks: int, output_dir: str, max_shard_size: str = "5GB") -> ExpansionResult:
    """Write the LLaMA Pro expansion of the model in ``model_dir`` to ``output_dir``.

    Args:
        model_dir: A local model folder: `config.json` and safetensors (or `pytorch_model.bin`) weights, sharded
            or not.
        num_new_blocks: Blocks to add, N; must divide the number of layers.
        output_dir: A new (or empty) folder. It gets the updated `config.json`, the weights as safetensors (with
            `model.safetensors.index.json` when sharded), and every other file of ``model_dir`` (tokenizer,
            generation config).
        max_shard_size: Largest weight file, as transformers' `save_pretrained` reads it ("5GB", "200MB").

    Raises:
        FreezeConfigError: a folder that is not a model, an N that does not divide the layers, layers without the
            projections to zero, a non-empty ``output_dir``.
    """
    config = _read_config(model_dir)
    num_layers = config["num_hidden_layers"]
    _check_num_new_blocks(num_new_blocks, num_layers)
    _check_output_dir(model_dir, output_dir)
    state_dict = _read_weights(model_dir)
    container = _layer_container(state_dict, num_layers, model_dir)
    group = num_layers // num_new_blocks
    new_index = {old: old + old // group for old in range(num_layers)}
    copied = {old: new_index[old] + 1 for old in range(num_layers) if (old + 1) % group == 0}
    expanded = _expanded_state_dict(state_dict, container, new_index, copied)

    os.makedirs(output_dir, exist_ok=True)
    weight_files = _write_weights(expanded, output_dir, max_shard_size)
    extended = _write_config(config, model_dir, output_dir, num_layers, new_index, copied)
    copied_files, not_copied = _copy_other_files(model_dir, output_dir)
    return ExpansionResult(
        num_layers=num_layers, num_new_blocks=num_new_blocks, new_layers=sorted(copied.values()),
        layer_container=container, weight_files=weight_files, copied_files=copied_files, not_copied=not_copied,
        extended_config_lists=extended,
    )


# -- checks --------------------------------------------------------------------------------------------------------


def _read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise invalid("model_dir", model_dir, "a local model folder with a config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config.get("num_hidden_layers"), int):
        nested = [key for key, value in config.items() if isinstance(value, dict) and "num_hidden_layers" in value]
        raise invalid(
            "model_dir", model_dir, "a model whose config.json has a top-level `num_hidden_layers` (a decoder such "
            "as Llama, Mistral, Qwen2)",
            hint=f"Its layers are counted in {', '.join(nested)} (a multi-part model), which expand does not handle."
            if nested else None,
        )
    return config


def _check_num_new_blocks(num_new_blocks: int, num_layers: int) -> None:
    if not 1 <= num_new_blocks <= num_layers or num_layers % num_new_blocks:
        divisors = [count for count in range(1, num_layers + 1) if num_layers % count == 0]
        raise invalid(
            "num_new_blocks", num_new_blocks, f"a divisor of the model's {num_layers} layers: "
            + ", ".join(map(str, divisors)),
            hint="One block is added after every num_layers / num_new_blocks layers (LLaMA-Factory refuses the same).",
        )


def _check_output_dir(model_dir: str, output_dir: str) -> None:
    if os.path.abspath(output_dir) == os.path.abspath(model_dir):
        raise invalid("output_dir", output_dir, "a folder other than MODEL_DIR")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise invalid("output_dir", output_dir, "a new or empty folder (nothing is overwritten)")


# -- weights -------------------------------------------------------------------------------------------------------


def _read_weights(model_dir: str) -> "OrderedDict[str, object]":
    found = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not found:
        raise invalid("model_dir", model_dir, f"a model folder with weights ({', '.join(_WEIGHT_FILES)})")
    name = found[0]
    if name.endswith(".index.json"):
        with open(os.path.join(model_dir, name), encoding="utf-8") as handle:
            shards = list(dict.fromkeys(json.load(handle)["weight_map"].values()))
    else:
        shards = [name]
    state_dict: "OrderedDict[str, object]" = OrderedDict()
    for shard in shards:
        state_dict.update(_load_file(os.path.join(model_dir, shard)))
    return state_dict


def _load_file(path: str) -> Dict[str, object]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _layer_container(state_dict, num_layers: int, model_dir: str) -> str:
    """The prefix of the layer keys: the one container whose indices are exactly 0 .. num_layers - 1."""
    indices: Dict[str, set] = {}
    for key in state_dict:
        match = _LAYER_KEY.match(key)
        if match:
            indices.setdefault(match["container"], set()).add(int(match["index"]))
    candidates = [container for container, seen in indices.items() if seen == set(range(num_layers))]
    if len(candidates) != 1:
        found = {container: len(seen) for container, seen in indices.items()}
        raise invalid(
            "model_dir", model_dir, f"weights with one container of {num_layers} layers (`num_hidden_layers`)",
            hint=f"Numbered containers found: {found or 'none'}.",
        )
    return candidates[0]


def _expanded_state_dict(state_dict, container: str, new_index: Dict[int, int], copied: Dict[int, int]):
    import torch

    by_layer: Dict[int, List[Tuple[str, str]]] = {}
    for key in state_dict:
        match = _LAYER_KEY.match(key)
        if match and match["container"] == container:
            by_layer.setdefault(int(match["index"]), []).append((key, match["rest"]))
    for old in copied:
        missing = [name for name in ZEROED if not any(name in rest for _, rest in by_layer[old])]
        if missing:
            raise invalid(
                "model_dir", container, f"layers with {' and '.join(repr(name) for name in ZEROED)} weights, which "
                "LLaMA Pro's expansion zeroes so that each new block starts as the identity",
                hint=f"Layer {old} has no {', '.join(map(repr, missing))}: "
                f"{sorted({rest for _, rest in by_layer[old]})[:8]}.",
            )
    expanded: "OrderedDict[str, object]" = OrderedDict()
    written = set()
    for key, tensor in state_dict.items():
        match = _LAYER_KEY.match(key)
        if not match or match["container"] != container:
            expanded[key] = tensor
            continue
        old = int(match["index"])
        if old in written:
            continue
        written.add(old)
        for source, rest in by_layer[old]:
            expanded[f"{container}.{new_index[old]}.{rest}"] = state_dict[source]
        if old in copied:
            for source, rest in by_layer[old]:
                value = state_dict[source]
                # A clone, not the same tensor: the new block trains apart from the original one.
                copy = torch.zeros_like(value) if any(name in rest for name in ZEROED) else value.clone()
                expanded[f"{container}.{copied[old]}.{rest}"] = copy
    return expanded


def _write_weights(state_dict, output_dir: str, max_shard_size: str) -> List[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state_dict = _without_shared_storage(state_dict)
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].contiguous() for name in names}
        save_file(shard, os.path.join(output_dir, filename), metadata={"format": "pt"})
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.write("\n")
        files.append("model.safetensors.index.json")
    return files


def _without_shared_storage(state_dict):
    """safetensors refuses two names on one storage (a `pytorch_model.bin` with tied weights): later names get a
    copy."""
    seen, result = set(), OrderedDict()
    for name, tensor in state_dict.items():
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        result[name] = tensor.clone() if pointer is not None and pointer in seen else tensor
        if pointer is not None:
            seen.add(pointer)
    return result


# -- config and the other files ------------------------------------------------------------------------------------


def _write_config(config: dict, model_dir: str, output_dir: str, num_layers: int, new_index, copied) -> List[str]:
    """The config with `num_hidden_layers` updated and every per-layer list (`layer_types`, ...) extended: a new
    block gets the entry of the layer it copies, so the original layers keep theirs."""
    config = dict(config)
    config["num_hidden_layers"] = num_layers + len(copied)
    per_layer = _per_layer_lists(config, model_dir, num_layers)
    for key, values in per_layer.items():
        extended: List[Optional[object]] = [None] * (num_layers + len(copied))
        for old, value in enumerate(values):
            extended[new_index[old]] = value
            if old in copied:
                extended[copied[old]] = value
        config[key] = extended
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return sorted(per_layer)


def _per_layer_lists(config: dict, model_dir: str, num_layers: int) -> Dict[str, list]:
    # A list named for layers with one entry per layer ('layer_types'); 'architectures' may be as long by chance.
    lists = {
        key: value for key, value in config.items()
        if isinstance(value, list) and len(value) == num_layers and "layer" in key
    }
    # transformers derives `layer_types` when config.json has none (from `sliding_window`, `max_window_layers`...):
    # derived from the new layer count, it would shift the original layers' attention; write it out instead.
    if "layer_types" not in lists:
        derived = _derived_layer_types(model_dir, num_layers)
        if derived is not None:
            lists["layer_types"] = derived
    return lists


def _derived_layer_types(model_dir: str, num_layers: int) -> Optional[list]:
    try:
        from transformers import AutoConfig

        values = getattr(AutoConfig.from_pretrained(model_dir), "layer_types", None)
    except (OSError, ValueError, KeyError, ImportError):
        return None  # a config transformers cannot read (custom code): config.json's own lists are all there is
    return list(values) if isinstance(values, (list, tuple)) and len(values) == num_layers else None


def _copy_other_files(model_dir: str, output_dir: str) -> Tuple[List[str], List[str]]:
    copied, skipped = [], []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name == CONFIG_NAME or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(output_dir, name))
            copied.append(name)
        else:
            skipped.append(name)
    return copied, skipped


def format_result(result: ExpansionResult, output_dir: str) -> str:
    """What `hf-freeze expand` prints: what was written, and the options that train the new blocks."""
    lines = [
        f"Expanded {result.num_layers} layers to {result.num_expanded_layers} in {output_dir}: new blocks at "
        f"{result.layer_container}.{{{', '.join(map(str, result.new_layers))}}}, each a copy of the layer before it "
        f"with {' and '.join(ZEROED)} set to zero (the identity until trained).",
        f"Weights: {', '.join(result.weight_files)}.",
    ]
    if result.extended_config_lists:
        lines.append(f"Per-layer config lists extended: {', '.join(result.extended_config_lists)}.")
    if result.copied_files:
        lines.append(f"Copied: {', '.join(result.copied_files)}.")
    if result.not_copied:
        lines.append(f"Not copied (folders): {', '.join(result.not_copied)}.")
    lines += [
        "Train the new blocks only with:",
        "  freeze_strategy: llama_pro",
        f"  freeze_num_new_blocks: {result.num_new_blocks}",
    ]
    return "\n".join(lines)

