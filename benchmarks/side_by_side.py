"""Measure the step time of several configurations of one model side by side: one process, one Trainer per
configuration, each in its own thread, taking turns step by step.

Why: on a shared machine the load from other jobs comes and goes over seconds to minutes. Configurations measured
one after the other (one process each) see different loads, and their ratios moved by 10-25% from run to run
here. Taking turns step by step, every configuration sees the same load within a few seconds, so a burst hits all
of them alike and the ratios hold.

Only one thread runs at a time (a baton passes from one configuration to the next at every `on_step_end`), and
the step time on CPU is the CPU time of that thread (`time.thread_time`) with one torch thread: the work the step
does, not the time other jobs held the core. On a GPU it is wall time read after `torch.cuda.synchronize()`.
Memory is not measured here (every configuration's tensors share the process): `run.py` measures it per
configuration in a process of its own (`worker.py`).
"""

from __future__ import annotations

import argparse
import statistics
import shutil
import threading
import time

from transformers import TrainerCallback

import worker


class Baton:
    """Lets one configuration run at a time, in a fixed order."""

    def __init__(self, names):
        self.order = list(names)
        self.holder = self.order[0] if self.order else None
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self.holder == name)

    def pass_on(self, name: str) -> None:
        with self._condition:
            self.holder = self._next(name)
            self._condition.notify_all()

    def leave(self, name: str) -> None:
        with self._condition:
            if name not in self.order:
                return
            following = self._next(name)
            self.order.remove(name)
            if self.holder == name:
                self.holder = following if self.order else None
            self._condition.notify_all()

    def _next(self, name: str) -> str:
        return self.order[(self.order.index(name) + 1) % len(self.order)]


class TurnTimer(TrainerCallback):
    """Times each step of one configuration, and hands the baton on after it."""

    def __init__(self, baton: Baton, name: str, cuda: bool):
        self.baton, self.name, self.cuda = baton, name, cuda
        self.step_times, self.forward_times = [], []
        self._start = self._forward_start = 0.0

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.forward_times.append(0.0)
        self._start = self._now()

    def forward_begins(self, module, args):
        self._forward_start = self._now()

    def forward_ends(self, module, args, output):
        self.forward_times[-1] += self._now() - self._forward_start

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(self._now() - self._start)
        self.forward_times.append(0.0)
        self.baton.pass_on(self.name)
        self.baton.wait(self.name)
        self._start = self._now()

    def on_train_end(self, args, state, control, **kwargs):
        self.baton.leave(self.name)


def take_turns(baton: Baton, trainers: dict) -> dict:
    """Train every trainer (name -> Trainer with a `TurnTimer` of ``baton``) in its own thread, one at a time as the
    baton passes; returns the error of each training that failed, by name, so that none is lost in a thread."""
    errors = {}

    def train(name):
        try:
            baton.wait(name)
            trainers[name].train()
        except Exception as error:
            errors[name] = repr(error)
        finally:
            baton.leave(name)

    threads = [threading.Thread(target=train, args=(name,), daemon=True) for name in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def run_side_by_side(options: dict) -> list:
    """Train every configuration in ``options["configs"]`` of one model and checkpointing mode, taking turns.

    Returns one result per configuration: its step times and their median after the warm-up steps, or
    ``status="n/a"`` for a configuration that does not apply to the model.
    """
    import torch

    from hf_freeze import FreezeConfigError

    cuda = torch.cuda.is_available() if options["device"] == "auto" else options["device"] == "cuda"
    names = list(options["configs"])
    baton = Baton(names)
    steps = options["warmup"] + options["steps"]
    runs, results = {}, {}
    for name in names:
        args = argparse.Namespace(**dict(options, config=name))
        timer = TurnTimer(baton, name, cuda)
        try:
            trainer, model, layout = worker.build_trainer(args, [timer], steps)
        except FreezeConfigError as error:  # a strategy that does not apply to a model is a row too
            baton.leave(name)
            results[name] = dict(status="n/a", message=str(error).split(". ")[0].split(":")[0])
            continue
        model.register_forward_pre_hook(timer.forward_begins)
        model.register_forward_hook(timer.forward_ends)
        runs[name] = (trainer, model, layout, timer, args)

    errors = take_turns(baton, {name: run[0] for name, run in runs.items()})
    for name, (trainer, model, layout, timer, args) in runs.items():
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
        if name in errors:
            results[name] = dict(status="error", message=errors[name])
            continue
        measured = timer.step_times[options["warmup"]:]
        forward = timer.forward_times[options["warmup"]:steps]
        results[name] = dict(
            status="ok",
            device=torch.cuda.get_device_name() if cuda else "cpu",
            clock="wall time (cuda synchronized)" if cuda else "thread CPU time, 1 torch thread",
            step_times=timer.step_times,
            step_time=statistics.median(measured),
            forward_times=timer.forward_times,
            forward_time=statistics.median(forward),
            **worker.describe(args, model, layout),
        )
    return [dict(results[name], config=name) for name in names]
