"""`python -m hf_freeze ...` is the `hf-freeze` command."""

import sys

from .cli import main

sys.exit(main())
