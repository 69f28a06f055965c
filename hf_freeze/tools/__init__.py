"""Tools around a policy, before training: `hf-freeze plan` (what a policy freezes, when, and the memory it saves,
from a config alone), `hf-freeze validate` (every problem of a training YAML), and the generated option
reference (`python -m hf_freeze.tools.docs`)."""
