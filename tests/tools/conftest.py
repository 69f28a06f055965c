"""Shared by the search tests (`test_hpo.py`, `test_hpo_stages.py`)."""

import pytest
import torch


@pytest.fixture
def quiet_one_thread():
    # Tiny models on a shared 2-core machine run ~10x faster on one intra-op thread than on oversubscribed ones.
    import optuna

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    torch.set_num_threads(threads)
