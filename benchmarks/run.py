"""Benchmark hf_freeze's freezing configurations against full fine-tuning and the FLOP model's limit.

    python benchmarks/run.py            # 3 models x 8 configurations x checkpointing off/on, 3 repeats
    python benchmarks/run.py --quick    # GPT-2 only, 5 configurations, short sequences: a smoke run

Step time: the configurations of one model and checkpointing mode run side by side in one process, taking turns
step by step (`side_by_side.py`), so that load from other jobs on a shared machine hits them all alike. That is
repeated `--repeats` times, each time in a fresh process with the configurations in a rotated order; each
repeat gives every configuration a ratio to full fine-tuning, and the report shows the median ratio with its
spread (min-max over the repeats). Peak memory does not depend on the load: it is measured once per
configuration, in a process of its own (`worker.py`). Writes `results.json`, `results.md` and PNG charts into
`--output` (default `benchmarks/results` on CPU, `benchmarks/results/cuda` on a GPU, quick:
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

from configurations import CONFIGURATIONS, DEFAULT_CONFIGURATIONS, DEFAULT_MODELS, MODELS, QUICK_CONFIGURATIONS  # noqa: E402

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 only, 5 configurations, batch 4 x 64 tokens, 1 + 3 steps, 2 repeats.")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help=f"Default: {' '.join(DEFAULT_MODELS)} (quick: gpt2).")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGURATIONS), help="Default: the 8 rows of the docs (quick: a subset).")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "non_reentrant", "reentrant"],
                        default=["off", "non_reentrant"], help="Activation checkpointing modes to run.")
    parser.add_argument("--warmup", type=int, help="Warm-up steps per configuration (default 1).")
    parser.add_argument("--steps", type=int, help="Measured steps per configuration and repeat (default 3).")
    parser.add_argument("--repeats", type=int, help="Side-by-side runs, each in a fresh process (default 3, quick 2).")
    parser.add_argument("--batch-size", type=int, help="Default 8, or the model's own (llama128k: 4); quick 4.")
    parser.add_argument("--seq-len", type=int, help="Default 128 (quick 64).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1, see worker.py).")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="Skip the peak-memory processes.")
    parser.add_argument("--no-time", dest="time", action="store_false",
                        help="Run no side-by-side step timing (use the runs already in OUTPUT/runs).")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="Only measure (into OUTPUT/runs); a later command with the same options merges the runs.")
    parser.add_argument("--output", help="Folder for the table and charts (default: see above).")
    parser.add_argument("--timeout", type=int, default=3600, help="Seconds one process may take.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite the table and charts from --output's results.json.")
    parser.add_argument("--update-memory", action="store_true",
                        help="Measure only the peak memory of --models x --configs x --checkpointing (after a change that "
                             "moves memory, not arithmetic) and write it into --output's results.json; the step times "
                             "stay, and the report names this command beside the one that timed them.")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["gpt2"] if quick else list(DEFAULT_MODELS))
    args.configs = args.configs or (QUICK_CONFIGURATIONS if quick else list(DEFAULT_CONFIGURATIONS))
    if "full" not in args.configs:
        args.configs = ["full"] + args.configs  # ratios need full fine-tuning from the same run
    import torch

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.output = args.output or os.path.join(HERE, "results", "quick" if quick else ("cuda" if on_gpu else ""))
    args.warmup = args.warmup if args.warmup is not None else 1
    args.steps = args.steps if args.steps is not None else 3
    args.repeats = args.repeats or (2 if quick else 3)
    args.seq_len = args.seq_len or (64 if quick else 128)
    return args


def _batch_size(args, model: str) -> int:
    return args.batch_size or (4 if args.quick else MODELS[model].get("batch_size", 8))


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


def _rotated(items, by):
    by %= len(items)
    return items[by:] + items[:by]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report_only:
        from report import write_report

        with open(os.path.join(args.output, "results.json")) as handle:
            saved = json.load(handle)
        print(", ".join(write_report(saved["results"], saved["callback_overhead"], saved["settings"], args.output)))
        return
    if args.update_memory:
        update_memory(args, argv)
        return
    import overhead
    import side_by_side
    import worker
    from report import write_report

    context = multiprocessing.get_context("forkserver")
    # The server imports these once; each run is a fresh fork of it.
    context.set_forkserver_preload(["torch", "transformers", "peft", "worker", "side_by_side", "overhead", "hf_freeze"])
    started = time.time()
    groups = [(model, mode) for model in args.models for mode in args.checkpointing]
    by_key = {}
    # Every finished run is kept in OUTPUT/runs/: an interrupted benchmark resumes there, and runs made by separate
    # commands (one model each, memory alone) merge into one report.
    runs = os.path.join(args.output, "runs")
    os.makedirs(runs, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for model, mode in groups:
                configs = _rotated(list(args.configs), repeat)  # no configuration always follows the same one
                options = dict(
                    model=model, configs=configs, checkpointing=mode, warmup=args.warmup, steps=args.steps,
                    batch_size=_batch_size(args, model), seq_len=args.seq_len, device=args.device, threads=args.threads,
                    out=os.path.join(runs, f"{model}-{mode}-{repeat}.json"),
                )
                t0 = time.time()
                results = _finished(options["out"])
                if results is not None:
                    pass
                elif args.time:
                    results = _run_in_own_process(context, _side_by_side_to_file, options, args.timeout)
                else:
                    continue
                if isinstance(results, dict):  # the whole process failed
                    results = [dict(results, config=config) for config in configs]
                for result in results:
                    by_key.setdefault((model, result["config"], mode), []).append(result)
                shown = ", ".join(f"{r['config']} {r['step_time']:.3f}" for r in results if r.get("status") == "ok")
                print(f"[repeat {repeat + 1}/{args.repeats}] {model} ckpt={mode}: {shown} s/step ({time.time() - t0:.0f} s)",
                      flush=True)
        memory = {}
        if args.memory:
            for model, mode in groups:
                for config in args.configs:
                    if (model, config, mode) in by_key and by_key[(model, config, mode)][0].get("status") != "ok":
                        continue
                    options = dict(
                        model=model, config=config, checkpointing=mode, warmup=0, steps=1,
                        batch_size=_batch_size(args, model), seq_len=args.seq_len, device=args.device,
                        threads=args.threads, measure_memory=True, out=os.path.join(runs, f"memory-{model}-{config}-{mode}.json"),
                    )
                    result = _finished(options["out"])
                    if result is None:
                        result = _run_in_own_process(context, worker.run_one, options, args.timeout)
                    memory[(model, config, mode)] = result.get("peak_memory")
                    print(f"[memory] {model} {config} ckpt={mode}: {(result.get('peak_memory') or 0) / 2**20:.0f} MB", flush=True)
        if not args.report:
            print(f"measured into {runs} in {time.time() - started:.0f} s")
            return
        results = [_combine(model, config, mode, repeats, memory.get((model, config, mode)))
                   for (model, config, mode), repeats in by_key.items()]
        options = dict(out=os.path.join(scratch, "overhead.json"), seq_len=args.seq_len, batch_size=8)
        callback_overhead = _run_in_own_process(context, overhead.run_overhead, options, args.timeout)
    settings = {key: getattr(args, key) for key in ("quick", "warmup", "steps", "repeats", "batch_size", "seq_len", "device", "threads")}
    settings["batch_sizes"] = {model: _batch_size(args, model) for model in args.models}
    settings["command"] = ("python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    settings["wall_time_s"] = round(time.time() - started)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump({"settings": settings, "results": results, "callback_overhead": callback_overhead}, handle, indent=1)
    paths = write_report(results, callback_overhead, settings, args.output)
    print(f"done in {settings['wall_time_s']} s: " + ", ".join(paths))


def update_memory(args, argv=None) -> None:
    """Re-measure peak memory into an existing results.json, each configuration in a process of its own."""
    import worker
    from report import write_report

    path = os.path.join(args.output, "results.json")
    with open(path) as handle:
        saved = json.load(handle)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "worker", "hf_freeze"])
    by_key = {(r["model"], r["config"], r["checkpointing"]): r for r in saved["results"]}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for mode in args.checkpointing:
                for config in args.configs:
                    result = by_key.get((model, config, mode))
                    if result is None or result.get("status") != "ok":
                        continue
                    options = dict(
                        model=model, config=config, checkpointing=mode, warmup=0, steps=1,
                        batch_size=saved["settings"]["batch_sizes"][model], seq_len=saved["settings"]["seq_len"],
                        device=args.device, threads=args.threads, measure_memory=True,
                        out=os.path.join(scratch, f"memory-{model}-{config}-{mode}.json"),
                    )
                    measured = _run_in_own_process(context, worker.run_one, options, args.timeout)
                    if measured.get("status") != "ok":
                        raise SystemExit(f"{model} {config} ckpt={mode}: {measured.get('message')}")
                    print(f"[memory] {model} {config} ckpt={mode}: {result.get('peak_memory', 0) / 2**20:.0f} MB -> "
                          f"{measured['peak_memory'] / 2**20:.0f} MB", flush=True)
                    result["peak_memory"] = measured["peak_memory"]
    command = ("python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    saved["settings"]["memory_command"] = f"{command} ({round(time.time() - started)} s)"
    with open(path, "w") as handle:
        json.dump(saved, handle, indent=1)
    print(", ".join(write_report(saved["results"], saved["callback_overhead"], saved["settings"], args.output)))


def _side_by_side_to_file(options: dict) -> None:
    import side_by_side

    results = side_by_side.run_side_by_side(options)
    with open(options["out"] + ".partial", "w") as handle:  # a run cut short leaves no file that looks finished
        json.dump(results, handle)
    os.replace(options["out"] + ".partial", options["out"])


def _finished(path: str):
    """The saved run at ``path``, or None when there is none (or only a run cut short)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _combine(model, config, mode, repeats, peak_memory) -> dict:
    """One configuration's repeats as one result: the per-repeat medians, their median, and the peak memory."""
    measured = [result for result in repeats if result.get("status") == "ok"]
    if not measured:
        return dict(repeats[0], model=model, config=config, checkpointing=mode)
    import statistics

    combined = dict(measured[0], model=model, config=config, checkpointing=mode, peak_memory=peak_memory)
    combined["repeat_step_times"] = [result["step_time"] for result in measured]
    combined["repeat_forward_times"] = [result["forward_time"] for result in measured]
    combined["step_time"] = statistics.median(combined["repeat_step_times"])
    combined["forward_time"] = statistics.median(combined["repeat_forward_times"])
    combined["step_times"] = [result["step_times"] for result in measured]
    combined.pop("forward_times", None)
    return combined


if __name__ == "__main__":
    main()
