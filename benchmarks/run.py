"""Benchmark hf_freeze's freezing configurations against full fine-tuning and the FLOP model's limit.

    python benchmarks/run.py            # the full matrix: 3 models x 10 configurations x checkpointing off/on
    python benchmarks/run.py --quick    # GPT-2 only, 5 configurations, short sequences: a smoke run

Every configuration runs in its own process (forked from a server that has imported torch and transformers
once, so no configuration inherits another's memory, and the import cost is paid once). Writes
`results.json`, `results.md` and PNG charts into `--output` (default `benchmarks/results`, quick:
`benchmarks/results/quick`). Runs on the GPU when there is one (`--device auto`), otherwise on CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the CPU memory profiler warns about pre-existing blocks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from configurations import CONFIGURATIONS, MODELS, QUICK_CONFIGURATIONS  # noqa: E402

CHECKPOINTING = {"off": False, "non_reentrant": True}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 only, 5 configurations, batch 4 x 64 tokens, 1 + 3 steps.")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="Default: all (quick: gpt2).")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGURATIONS), help="Default: all (quick: a subset).")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "non_reentrant", "reentrant"],
                        default=["off", "non_reentrant"], help="Activation checkpointing modes to run.")
    parser.add_argument("--warmup", type=int, help="Warm-up steps (default 2, quick 1).")
    parser.add_argument("--steps", type=int, help="Measured steps, median reported (default 5, quick 3).")
    parser.add_argument("--batch-size", type=int, help="Default 8 (quick 4).")
    parser.add_argument("--seq-len", type=int, help="Default 128 (quick 64).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1, see worker.py).")
    parser.add_argument("--rounds", type=int, help="Processes per configuration, one round of the whole matrix after "
                        "the other; the lowest per-process median is kept (default: 2 on CPU, 1 on a GPU; quick: 1).")
    parser.add_argument("--output", help="Folder for the table and charts (default benchmarks/results, quick: benchmarks/results/quick).")
    parser.add_argument("--timeout", type=int, default=900, help="Seconds one configuration may take.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the table and charts from --output's results.json.")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["gpt2"] if quick else list(MODELS))
    args.configs = args.configs or (QUICK_CONFIGURATIONS if quick else list(CONFIGURATIONS))
    if "full" not in args.configs:
        args.configs = ["full"] + args.configs  # ratios need full fine-tuning from the same run
    if args.rounds is None:
        import torch

        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.rounds = 1 if quick or on_gpu else 2
    args.output = args.output or os.path.join(HERE, "results", "quick" if quick else "")
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.steps = args.steps if args.steps is not None else (3 if quick else 5)
    args.batch_size = args.batch_size or (4 if quick else 8)
    args.seq_len = args.seq_len or (64 if quick else 128)
    return args


def _run_in_own_process(context, target, options, timeout):
    process = context.Process(target=target, args=(options,))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join()
        return {"status": "error", "message": f"timed out after {timeout} s"}
    if process.exitcode != 0 or not os.path.exists(options["out"]):
        return {"status": "error", "message": f"worker exited with code {process.exitcode}"}
    with open(options["out"]) as handle:
        return json.load(handle)


def _least_disturbed(rounds):
    """The round with the lowest median step time, with the memory of the round that measured it."""
    measured = [result for result in rounds if result.get("status") == "ok"]
    if not measured:
        return rounds[0]
    best = dict(min(measured, key=lambda result: result["step_time"]))
    best["round_step_times"] = [result["step_time"] for result in measured]
    best["peak_memory"] = next((r["peak_memory"] for r in measured if r.get("peak_memory")), best.get("peak_memory"))
    return best


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report_only:
        from report import write_report

        with open(os.path.join(args.output, "results.json")) as handle:
            saved = json.load(handle)
        print(", ".join(write_report(saved["results"], saved["callback_overhead"], saved["settings"], args.output)))
        return
    import worker
    import overhead
    from report import write_report

    context = multiprocessing.get_context("forkserver")
    # The server imports these once; each configuration is a fresh fork of it.
    context.set_forkserver_preload(["torch", "transformers", "peft", "worker", "overhead", "hf_freeze"])
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        # Round after round of the whole matrix: a burst of load from other jobs on a shared machine then hits one
        # process of a configuration, not all of them, and the lowest per-process median is kept.
        matrix = [(m, c, k) for m in args.models for k in args.checkpointing for c in args.configs]
        jobs = [(r, m, c, k) for r in range(args.rounds) for (m, c, k) in matrix]
        by_key = {}
        for index, (round_index, model, config, checkpointing) in enumerate(jobs, 1):
            options = dict(
                model=model, config=config, checkpointing=checkpointing, warmup=args.warmup, steps=args.steps,
                batch_size=args.batch_size, seq_len=args.seq_len, device=args.device, threads=args.threads,
                measure_memory=round_index == 0, out=os.path.join(scratch, f"{index}.json"),
            )
            t0 = time.time()
            result = _run_in_own_process(context, worker.run_one, options, args.timeout)
            result.update(model=model, config=config, checkpointing=checkpointing)
            by_key.setdefault((model, config, checkpointing), []).append(result)
            shown = f"{result['step_time']:.3f} s/step" if result.get("status") == "ok" else result.get("message", "")
            print(f"[{index}/{len(jobs)}] {model:7s} {config:14s} ckpt={checkpointing:13s} {shown} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        results = [_least_disturbed(rounds) for rounds in by_key.values()]
        options = dict(out=os.path.join(scratch, "overhead.json"), seq_len=args.seq_len, batch_size=args.batch_size)
        callback_overhead = _run_in_own_process(context, overhead.run_overhead, options, args.timeout)
    settings = {key: getattr(args, key) for key in ("quick", "warmup", "steps", "batch_size", "seq_len", "device", "threads", "rounds")}
    settings["command"] = ("python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    settings["wall_time_s"] = round(time.time() - started)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump({"settings": settings, "results": results, "callback_overhead": callback_overhead}, handle, indent=1)
    paths = write_report(results, callback_overhead, settings, args.output)
    print(f"done in {settings['wall_time_s']} s: " + ", ".join(paths))


if __name__ == "__main__":
    main()
