"""`freeze_cache_prefix` under 2-process DDP (torchrun, gloo): each process stores the examples it trains on, in
its own folder, and the run matches the same run without the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork-free torchrun with gloo on POSIX")

WORKER = Path(__file__).resolve().parents[1] / "distributed" / "prefix_cache_worker.py"
REPOSITORY = Path(__file__).resolve().parents[2]


def _launch(output_dir: Path, timeout: float = 400):
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    environment.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(output_dir)]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the 2-process run timed out:\n{output[-6000:]}")
    paths = [output_dir / f"rank{rank}.json" for rank in range(2)]
    assert process.returncode == 0 and all(path.exists() for path in paths), output[-6000:]
    return [json.loads(path.read_text()) for path in paths]


def test_each_process_caches_its_shard_and_training_matches(tmp_path):
    ranks = _launch(tmp_path)
    for rank, result in enumerate(ranks):
        plain, cached = result["plain"], result["cached"]
        torch.testing.assert_close(cached["losses"], plain["losses"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["weights"], plain["weights"], rtol=1e-4, atol=1e-5)
        stats = cached["stats"]
        # 24 examples, 12 a process an epoch, 3 epochs; the process stores only what it saw (at most the 24).
        assert stats["hits"] + stats["misses"] == 36
        assert 12 <= stats["misses"] <= 24 and stats["hits"] > 0
        assert stats["examples"] == 0 and stats["memory_bytes"] == 0  # deleted at the end; everything went to disk
        directory, files = cached["folder"]
        assert directory.endswith(f"rank-{rank}") and "hidden_states.bin" in files
        assert not cached["folder_after"]
    # DDP keeps the processes' weights identical, with the cache as without it.
    assert ranks[0]["cached"]["digest"] == ranks[1]["cached"]["digest"]
    assert ranks[0]["plain"]["digest"] == ranks[1]["plain"]["digest"]
