"""Launch `train_worker.py` on 2 CPU processes (torchrun, gloo) and collect each rank's results.

Run as a script to print the communication figures (bytes all-reduced per step, by policy):

    python tests/distributed/ddp_launch.py
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
WORKER = HERE / "train_worker.py"
LOOP_WORKER = HERE / "loop_worker.py"  # a plain loop with LayerFreezer under DDP and FSDP2
ACCELERATE_CONFIG = REPOSITORY / "configs" / "accelerate" / "ddp.yaml"
NUM_PROCESSES = 2


def launch(
    runs: Sequence[dict], output_dir: Path, timeout: float = 300, launcher: str = "torchrun",
    config: Path = ACCELERATE_CONFIG, worker: Optional[Path] = None,
) -> List[Dict[str, dict]]:
    """Run ``runs`` in one launch of 2 processes; return the results of every rank.

    ``launcher`` is "torchrun" (``--standalone``) or "accelerate" (``accelerate launch`` with a shipped accelerate
    ``config``, by default `configs/accelerate/ddp.yaml`, the command of docs/multi-gpu.md; the TrainingArguments'
    ``use_cpu`` keeps DDP on CPU, DeepSpeed runs on its CPU accelerator). ``worker``: the script each process runs
    (default `WORKER`, read at the call).
    """
    worker = worker or WORKER
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec = output_dir / "spec.json"
    spec.write_text(json.dumps({"output_dir": str(output_dir), "runs": list(runs)}, indent=1))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    environment.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if launcher == "torchrun":  # --standalone runs its own rendezvous on a free port: parallel launches never collide
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={NUM_PROCESSES}", str(worker), str(spec)]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", str(NUM_PROCESSES), "--main_process_port", str(_free_port()), str(worker),
                   str(spec)]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers, started in their own session
        output, _ = process.communicate()
        raise AssertionError(f"the 2-process run timed out after {timeout}s:\n{output[-6000:]}")
    paths = [output_dir / f"rank{rank}.json" for rank in range(NUM_PROCESSES)]
    if process.returncode != 0 or not all(path.exists() for path in paths):
        raise AssertionError(f"the 2-process run failed (exit {process.returncode}):\n{output[-6000:]}")
    return [json.loads(path.read_text()) for path in paths]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shared_launch(
    name: str, runs: Sequence[dict], timeout: float = 300, launcher: str = "torchrun", config: Path = ACCELERATE_CONFIG,
    worker: Optional[Path] = None,
) -> List[Dict[str, dict]]:
    """`launch`, once per test session even when pytest-xdist spreads the tests that read it over workers."""
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    directory = Path(tempfile.gettempdir()) / f"hf_freeze-distributed-{session}" / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here and then reads the results
        done, failed = directory / "results.json", directory / "failed.txt"
        if done.exists():
            return json.loads(done.read_text())
        if failed.exists():  # do not relaunch a failing run for every test that reads it
            raise AssertionError(failed.read_text())
        try:
            results = launch(runs, directory, timeout, launcher, config, worker)
        except AssertionError as error:
            failed.write_text(str(error))
            raise
        done.write_text(json.dumps(results))
        return results


def communication_table(policies: Dict[str, dict], pretrained: str = "") -> str:
    runs = [{"label": label, "policy": policy, "pretrained": pretrained,
             "reapply_each_step": policy["freeze_strategy"].startswith("test_")}  # see DYNAMIC_POLICIES
            for label, policy in policies.items()]
    with tempfile.TemporaryDirectory() as directory:
        ranks = launch(runs, Path(directory))
    rows = [f"{'policy':<22} {'trainable':>11} {'total':>11} {'bytes/step':>12} {'4 x trainable':>13} {'vs none':>7}"]
    full = None
    for label in policies:
        result = ranks[0][label]
        if result["status"] != "ok":
            rows.append(f"{label:<22} {result['error_type']}: {result['error'][:80]}")
            continue
        per_step = result["bytes_per_step"]
        mean = sum(per_step) / len(per_step)
        full = full or (mean if label == "none" else None)
        ratio = f"{mean / full:.1%}" if full else "-"
        # A policy that changes: the bytes of each step (only what trains then is all-reduced), and their mean.
        shown = f"{per_step[0]:,}" if len(set(per_step)) == 1 else f"{min(per_step):,}-{max(per_step):,} (mean {mean:,.0f})"
        rows.append(f"{label:<22} {result['trainable_params']:>11,} {result['total_params']:>11,} "
                    f"{shown:>12} {4 * result['trainable_params']:>13,} {ratio:>7}")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    sys.path[:0] = [str(REPOSITORY / "tests" / "integrations"), str(REPOSITORY / "tests")]
    from test_distributed import DYNAMIC_POLICIES, ROTATING_POLICIES, STATIC_POLICIES

    flags = argparse.ArgumentParser(description="Print the bytes DDP all-reduces per step, by freezing policy.")
    flags.add_argument("--pretrained", default="", help="a local model directory (default: the tiny test BERT)")
    options = flags.parse_args()
    model = options.pretrained or "tiny BERT, 4 layers"
    print(f"Bytes all-reduced per optimizer step by DDP ({model}; fp32; 2 gloo processes; 3 steps):")
    rotating = {"lisa": ROTATING_POLICIES["lisa"], "badam": {"freeze_strategy": "badam", "freeze_schedule_every": 1}}
    print(communication_table({**STATIC_POLICIES, **DYNAMIC_POLICIES, **rotating}, options.pretrained))
