"""Test set-up shared by every folder: the tiny-model helpers (`tests/tiny.py`) import as `tiny` from any folder."""

import logging
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def _hf_freeze_logs_at_info():
    """A Trainer run with `log_level` set moves hf_freeze's logger to that level for the whole process
    (`follow_training_log_level`): put it back to its default after each test, so that a test reading the INFO lines
    does not depend on which tests ran before it in the same process."""
    yield
    logger = logging.getLogger("hf_freeze")
    if logger.handlers:
        logger.setLevel(logging.INFO)
