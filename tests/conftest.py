"""Test set-up shared by every folder: the tiny-model helpers (`tests/tiny.py`) import as `tiny` from any folder."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
