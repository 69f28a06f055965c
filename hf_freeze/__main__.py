"""`python -m hf_freeze ...` is the `hf-freeze` command."""

import sys

from .tools.cli import main

sys.exit(main())
