"""Run offline unless the command names a model on the Hugging Face Hub.

The examples' default models are local (the MiniLM package, or small models built from a config), so they set
`HF_HUB_OFFLINE=1` to never wait on the network. A Hub model id (`--model_name_or_path bert-base-uncased`, on the
command line or in the YAML file given first) needs the network, so then they leave it on; an `HF_HUB_OFFLINE` you set
yourself always wins. It must run before transformers is imported, which reads the variable once.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

__all__ = ["offline_unless_hub_model"]


def _named_models(argv: Sequence[str], option: str) -> List[str]:
    names = []
    for index, item in enumerate(argv):
        if item == f"--{option}" and index + 1 < len(argv):
            names.append(argv[index + 1])
        elif item.startswith(f"--{option}="):
            names.append(item.split("=", 1)[1])
    config = argv[0] if argv and argv[0].endswith((".yaml", ".yml", ".json")) else None
    if config and os.path.isfile(config):
        import yaml  # reads JSON too

        with open(config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if isinstance(values, dict) and values.get(option):
            names.append(str(values[option]))
    return names


def offline_unless_hub_model(argv: Optional[Sequence[str]] = None, option: str = "model_name_or_path") -> bool:
    """Set `HF_HUB_OFFLINE=1` unless it is set already or `argv` names a model that is not a local path.

    Returns whether the run is offline.
    """
    if "HF_HUB_OFFLINE" not in os.environ:
        names = _named_models(list(sys.argv[1:] if argv is None else argv), option)
        if all(os.path.exists(name) for name in names):
            os.environ["HF_HUB_OFFLINE"] = "1"
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
