"""The training-loss lever (`freeze_chunked_loss`): the causal-LM loss computed without materialising the logits.

With freezing and activation checkpointing, the logits and their gradient are what is left of a step's activation
memory. `chunked.py` computes transformers' causal-LM loss in chunks of tokens through hooks; `lever.py` decides,
from the options and the model, whether the lever is on, and attaches it to a `LayerFreezer`.
"""

from .chunked import CHUNK_TOKENS, ChunkedLossHooks, chunked_cross_entropy, chunked_loss_unsupported, set_chunked_loss
from .lever import TrainingLoss, wants_chunked_loss

__all__ = [
    "CHUNK_TOKENS",
    "ChunkedLossHooks",
    "TrainingLoss",
    "chunked_cross_entropy",
    "chunked_loss_unsupported",
    "set_chunked_loss",
    "wants_chunked_loss",
]
