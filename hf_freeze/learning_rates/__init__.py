"""Learning rates per part and per layer (`freeze_learning_rates`, `freeze_layer_lr_decay`).

`rates.py` decides, without torch, the rate each parameter trains at; `add_on.py` hands those rates to a
`LayerFreezer`, which builds the optimizer's param groups from them (`LayerFreezer.parameter_groups`; the Trainer
gets them through `FreezeCallback`).
"""

from .add_on import LearningRates
from .rates import PART_WORDS, RATE_OPTIONS, check_rate_options, describe_rate, learning_rates, rate_entries

__all__ = ["LearningRates", "PART_WORDS", "RATE_OPTIONS", "check_rate_options", "describe_rate", "learning_rates", "rate_entries"]
