"""The add-ons `LayerFreezer` runs beside the policy, one room each, in the order they attach to the model: the loss
lever's hooks go on before the applier's, the frozen-prefix cache is built by the first application. Removing an
add-on is deleting its folder and its line here."""

from ..learning_rates import LearningRates
from ..lora import FrozenLayersLora
from ..loss import TrainingLoss
from ..prefix_cache import PrefixCache

__all__ = ["ADD_ONS"]

ADD_ONS = (TrainingLoss, PrefixCache, LearningRates, FrozenLayersLora)
