"""The local executor: configurations as `lmms-quant eval` subprocesses (or forks) on this machine's slots.

With several GPUs, configurations run in parallel, one subprocess per GPU (``CUDA_VISIBLE_DEVICES``),
or one per group of ``processes_per_config`` GPUs launched with ``accelerate launch`` (lmms-eval's own
data parallelism). On the CPU each configuration is a fork of a process that imported lmms-eval once.
The sweep writes each run.json itself, after the subprocess exited (:mod:`lmms_quant.sweep.rundir`),
and a lock on the output directory keeps two sweeps from working in it at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from lmms_quant.atomic import write_json_atomic
from lmms_quant.sweep.grid import Configuration, GridError
from lmms_quant.sweep.job import die_with_parent
from lmms_quant.sweep.rundir import (JOB_FILE, LOG_FILE, SweepBusy, accelerate_launcher, completed_run, config_meta, default_eval_command, eval_arguments,
                                     finish_run, prepare_run_dir, read_json, sweep_lock)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one configuration runs at a time: a group of GPUs, or the CPU (gpus == ())."""

    gpus: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else {}

    def launcher(self) -> list[str]:
        return accelerate_launcher(len(self.gpus)) if len(self.gpus) > 1 else []

    def __str__(self) -> str:
        return f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "CPU"


def detect_gpus() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return [int(v) for v in ids if v.isdigit()]
    try:
        import torch
    except ImportError:
        return []
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def make_slots(gpus: Sequence[int], processes_per_config: int = 1) -> list[Slot]:
    """One slot per GPU, or per group of ``processes_per_config`` GPUs; a single CPU slot without GPUs."""
    if not gpus:
        return [Slot()]
    if processes_per_config > len(gpus):
        raise GridError(f"processes_per_config: {processes_per_config} GPUs per configuration, "
                        f"but only {len(gpus)} available ({list(gpus)})")
    n = len(gpus) // processes_per_config
    return [Slot(tuple(gpus[i * processes_per_config:(i + 1) * processes_per_config])) for i in range(n)]


class ForkedEval:
    """``lmms-quant eval`` in a forked child of a process that has already imported lmms-eval.

    Importing lmms-eval costs ~10 s per process on a small CPU, more than evaluating a tiny model; a
    fork starts with it imported. The child is otherwise what the subprocess would be (own session,
    SIGKILLed with the sweep, output to the run's log, the slot's environment), and it exits with
    the command's status, so the runner treats both alike. Only for CPU slots: a fork must not
    inherit an initialised CUDA context.
    """

    def __init__(self, argv: list[str], log, env: dict[str, str]):
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                os.setsid()
                die_with_parent(parent)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os.environ.clear()
                os.environ.update(env)
                from lmms_quant.cli import main as cli_main

                code = cli_main(["eval", *argv])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # noqa: BLE001 - report and exit non-zero, never return into the sweep
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"lmms-quant eval (pid {self.pid})", timeout)
            time.sleep(0.05)
        return self.returncode


def preload_eval() -> None:
    """Import what every ``lmms-quant eval`` needs, once, before configurations are forked."""
    importlib.import_module("lmms_eval.__main__")
    importlib.import_module("lmms_eval.evaluator")
    importlib.import_module("lmms_quant.cli")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """'configuration k of n', elapsed time and an ETA from the configurations finished so far."""

    def __init__(self, total: int, n_slots: int, stream=None, clock: Callable[[], float] = time.monotonic):
        self.total, self.n_slots, self.clock = total, max(1, n_slots), clock
        self.stream = stream or sys.stdout
        self.start = clock()
        self.durations: list[float] = []
        self.counter = 0

    def next_index(self) -> int:
        self.counter += 1
        return self.counter

    def eta(self, pending: int, running_elapsed: Sequence[float]) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        work = pending * mean + sum(max(0.0, mean - e) for e in running_elapsed)
        return work / self.n_slots

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def elapsed(self) -> float:
        return self.clock() - self.start


def running_elsewhere(run_dir: Path) -> str | None:
    """The id of a live cluster job computing this configuration (from its job.json), or None."""
    record = read_json(Path(run_dir) / JOB_FILE)
    if record is None or "job_id" not in record:
        return None
    from lmms_quant.sweep.executors import is_active, job_states

    try:
        state = job_states([record]).get(record["job_id"])
    except ImportError:  # submitit gone: the job cannot be asked about; do not take it for dead
        return record["job_id"]
    return record["job_id"] if is_active(state, record) else None


def write_sweep_manifest(output_dir: Path, configurations: Sequence[Configuration]) -> None:
    write_json_atomic(Path(output_dir) / "sweep.json", {
        "configurations": [{"run_id": c.run_id, "label": c.label, **c.identity()} for c in configurations],
    })


@dataclasses.dataclass
class _Running:
    index: int
    config: Configuration
    run_dir: Path
    process: subprocess.Popen | ForkedEval
    started: float
    started_wall: float
    log: Any
    meta: dict


def run_locked(output_dir: Path, run, configurations: Sequence[Configuration]) -> dict[str, str]:
    """``run(configurations)`` holding the sweep's lock; a lock another sweep holds is a GridError
    (the CLI prints it and exits non-zero), here and on a cluster alike."""
    try:
        with sweep_lock(output_dir):
            return run(list(configurations))
    except SweepBusy as err:
        raise GridError(str(err)) from None


class SweepRunner:
    """Runs configurations into ``output_dir/runs/<id>``, skipping finished ones, one per slot at a time."""

    def __init__(self, output_dir: str | os.PathLike, *, slots: Sequence[Slot] = (Slot(),),
                 eval_command: Sequence[str] | None = None, stream=None, poll_interval: float = 0.2,
                 extra_env: dict[str, str] | None = None, fork: bool = False):
        self.output_dir = Path(output_dir)
        self.runs_dir = self.output_dir / "runs"
        self.slots = list(slots)
        self.eval_command = list(eval_command) if eval_command else default_eval_command()
        self.stream = stream or sys.stdout
        self.poll_interval = poll_interval
        self.extra_env = dict(extra_env or {})
        # Fork a preloaded process instead of starting `lmms-quant eval` afresh (CPU slots, default command).
        self.fork = fork and eval_command is None

    def run_dir(self, config: Configuration) -> Path:
        return self.runs_dir / config.run_id

    def command_for(self, config: Configuration, slot: Slot) -> list[str]:
        launcher = slot.launcher()
        if launcher:  # accelerate runs `python -m lmms_quant.cli eval ...` in each process
            return [*launcher, "eval", *eval_arguments(config, self.run_dir(config))]
        return [*self.eval_command, *eval_arguments(config, self.run_dir(config))]

    def run(self, configurations: Sequence[Configuration]) -> dict[str, str]:
        """Run what is not finished; return run id -> 'ok' | 'skipped' | 'failed' | 'running' (elsewhere)."""
        return run_locked(self.output_dir, self._run, configurations)

    def _run(self, configurations: list[Configuration]) -> dict[str, str]:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if self.fork and not all(completed_run(self.run_dir(c), c.run_id) for c in configurations):
            preload_eval()
        write_sweep_manifest(self.output_dir, configurations)
        progress = Progress(len(configurations), len(self.slots), self.stream)
        outcome: dict[str, str] = {}
        pending: deque[tuple[int, Configuration]] = deque()
        for config in configurations:
            index = progress.next_index()
            head = f"configuration {index} of {progress.total}: {config.label} [{config.run_id}]"
            if completed_run(self.run_dir(config), config.run_id):
                outcome[config.run_id] = "skipped"
                progress.say(f"{head} already complete, skipped")
            elif (job_id := running_elsewhere(self.run_dir(config))) is not None:
                outcome[config.run_id] = "running"
                progress.say(f"{head} is being computed by job {job_id}; not started here")
            else:
                pending.append((index, config))
        running: dict[Slot, _Running] = {}
        interrupted = False

        def on_term(signum, frame):
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
        try:
            while pending or running:
                for slot in self.slots:
                    if slot not in running and pending:
                        index, config = pending.popleft()
                        running[slot] = self._start(index, config, slot, progress)
                time.sleep(self.poll_interval)
                for slot, job in list(running.items()):
                    if job.process.poll() is None:
                        continue
                    del running[slot]
                    job.log.close()
                    duration = time.monotonic() - job.started
                    status = finish_run(job.run_dir, job.meta, job.process.returncode, job.started_wall,
                                        duration)["status"]
                    outcome[job.config.run_id] = status
                    if status == "ok":
                        progress.durations.append(duration)
                    eta = progress.eta(len(pending), [time.monotonic() - j.started for j in running.values()])
                    progress.say(
                        f"configuration {job.index} of {progress.total}: {job.config.label} "
                        f"{'done' if status == 'ok' else 'FAILED (see ' + str(job.run_dir / LOG_FILE) + ')'}"
                        f" in {fmt_duration(duration)}; elapsed {fmt_duration(progress.elapsed())}, "
                        f"ETA {fmt_duration(eta) if (pending or running) else '0m00s'}")
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or broken: leave no evaluation running
            interrupted = True
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if interrupted:
                for job in running.values():
                    self._stop(job)
        return outcome

    def _start(self, index: int, config: Configuration, slot: Slot, progress: Progress) -> _Running:
        run_dir = self.run_dir(config)
        command = self.command_for(config, slot)
        meta = config_meta(config, command)
        prepare_run_dir(run_dir, meta)  # an interrupted or failed attempt: nothing in it is trusted
        progress.say(f"configuration {index} of {progress.total}: {config.label} [{config.run_id}] "
                     f"starting on {slot}; elapsed {fmt_duration(progress.elapsed())}")
        log = open(run_dir / LOG_FILE, "wb")
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        env = {**os.environ, **self.extra_env, **slot.env()}
        if self.fork and not slot.gpus:
            process = ForkedEval(command[len(self.eval_command):], log, env)
        else:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=functools.partial(die_with_parent, os.getpid()),
                                       start_new_session=True)
        # Who computes this directory, for --status (the lock says whether this sweep still runs).
        write_json_atomic(run_dir / JOB_FILE, {"executor": "local", "pid": process.pid,
                                               "host": socket.gethostname(), "started": time.time()})
        return _Running(index, config, run_dir, process, time.monotonic(), time.time(), log, meta)

    def _stop(self, job: _Running) -> None:
        try:
            os.killpg(job.process.pid, signal.SIGTERM)
            job.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(job.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.log.close()
