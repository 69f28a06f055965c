"""hf_freeze's logger, built with transformers' logging helpers.

It prints at INFO by default so that the frozen/trainable table is seen; when the user sets `log_level` in the
`TrainingArguments`, the callback makes it follow that level (`follow_training_log_level`).
"""

from __future__ import annotations

import logging as _logging
import sys

from transformers.utils import logging as transformers_logging

_ROOT = "hf_freeze"


class _CurrentStderrHandler(_logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (notebooks and test runners replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str) -> _logging.Logger:
    root = transformers_logging.get_logger(_ROOT)
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(_logging.Formatter("[hf_freeze] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(_logging.INFO)
        root.propagate = False
    return transformers_logging.get_logger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def follow_training_log_level(args) -> None:
    """Use the level the user chose in `TrainingArguments.log_level`, if any ('passive' keeps ours)."""
    if getattr(args, "log_level", "passive") != "passive":
        transformers_logging.get_logger(_ROOT).setLevel(args.get_process_log_level())
