"""Sweeps beyond one machine: each configuration a submitit job (SLURM, or submitit's LocalExecutor).

The sweep hands the work to submitit and keeps only the bookkeeping that makes a rerun exact:

- a configuration whose run.json says ``ok`` is never resubmitted;
- one whose job is still alive (job.json names it; its state is asked of SLURM through submitit's job
  objects) is waited for, not resubmitted;
- everything else — never submitted, failed, or its job died (time limit, preemption, SIGKILL, node
  failure) — gets a fresh run directory and is submitted again: one job per configuration, or one job
  array for all of them (``slurm_array_parallelism``).

Every job runs the same `lmms-quant eval` command as a local run, into the same ``runs/<id>/``, and
writes run.json itself (:mod:`lmms_quant.sweep.job`), so results are identical to a local sweep's and
nothing depends on the submitting process surviving. The output directory (and the weight cache in
it) must be on a filesystem that the jobs' nodes share.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from lmms_quant.atomic import write_json_atomic
from lmms_quant.sweep.executors import (ExecutorSpec, check_available, is_active, job_failure, job_record,
                                        job_states, make_submitit_executor)
from lmms_quant.sweep.grid import Configuration, GridError
from lmms_quant.sweep.job import run_configuration
from lmms_quant.sweep.rundir import (JOB_FILE, LOG_FILE, completed_run, config_meta, eval_command_for, failed_run,
                                     last_error_line, prepare_run_dir, read_json, refresh_dir, tail_text)
from lmms_quant.sweep.scheduler import fmt_duration, run_locked, write_sweep_manifest

SUBMITIT_DIR = "submitit"


@dataclasses.dataclass
class _Outstanding:
    index: int
    config: Configuration
    run_dir: Path
    record: dict  # job.json
    dead_since: float | None = None


def _cluster_job(run_dir: Path) -> dict | None:
    """job.json of a submitit job (a local sweep's job.json names a process, not a job)."""
    record = read_json(run_dir / JOB_FILE)
    return record if record is not None and "job_id" in record else None


class SubmititRunner:
    """Submits what is missing, then (unless ``wait=False``) waits for every job and reports each outcome."""

    def __init__(self, output_dir, spec: ExecutorSpec, *, eval_command: Sequence[str] | None = None,
                 stream=None, poll_interval: float | None = None, wait: bool = True, job_name: str = "lmms-quant",
                 settle_s: float | None = None):
        self.output_dir = Path(output_dir).resolve()
        self.runs_dir = self.output_dir / "runs"
        self.spec = spec
        self.eval_command = list(eval_command) if eval_command else None
        self.stream = stream or sys.stdout
        slurm = spec.cluster == "slurm"
        # One sacct call per poll, for all jobs: every 30 s is gentle on slurmdbd and quick enough for
        # jobs that run for minutes to hours.
        self.poll_interval = poll_interval if poll_interval is not None else (30.0 if slurm else 0.5)
        # A dead job's run.json may take a while to show on this node's view of a network filesystem.
        self.settle_s = settle_s if settle_s is not None else (30.0 if slurm else 0.0)
        self.wait = wait
        self.job_name = job_name
        self._held: list = []  # submitit's job objects of this process's submissions

    def run_dir(self, config: Configuration) -> Path:
        return self.runs_dir / config.run_id

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def run(self, configurations: Sequence[Configuration]) -> dict[str, str]:
        """Returns run id -> 'skipped' | 'ok' | 'failed' | 'running' (left running, ``wait=False``)."""
        check_available(self.spec)
        return run_locked(self.output_dir, self._run, configurations)

    def _run(self, configurations: list[Configuration]) -> dict[str, str]:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        write_sweep_manifest(self.output_dir, configurations)
        total = len(configurations)
        outcome: dict[str, str] = {}
        alive, to_submit = [], []
        records = {c.run_id: _cluster_job(self.run_dir(c)) for c in configurations}
        states = job_states([r for c in configurations
                             if (r := records[c.run_id]) is not None and not completed_run(self.run_dir(c))])
        for index, config in enumerate(configurations, 1):
            run_dir, record = self.run_dir(config), records[config.run_id]
            head = f"configuration {index} of {total}: {config.label} [{config.run_id}]"
            refresh_dir(run_dir)
            if completed_run(run_dir, config.run_id):
                outcome[config.run_id] = "skipped"
                self.say(f"{head} already complete, skipped")
            elif (record is not None and failed_run(run_dir) is None
                  and is_active(states.get(record["job_id"]), record)):
                alive.append(_Outstanding(index, config, run_dir, record))
                self.say(f"{head} still running as job {record['job_id']} "
                         f"({states.get(record['job_id'])}); not resubmitted")
            else:
                to_submit.append((index, config))
        outstanding = alive + self._submit(to_submit, total)
        if not self.wait:
            for job in outstanding:
                outcome[job.config.run_id] = "running"
            if outstanding:
                self.say(f"{len(outstanding)} job(s) running; `lmms-quant sweep GRID --status` shows their state, "
                         "the same command without --no-wait waits for them")
            return outcome
        try:
            outcome.update(self._wait(outstanding, total))
        except KeyboardInterrupt:
            ids = [j.record["job_id"] for j in outstanding]
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            self.say(f"stopped waiting; {len(ids)} job(s) keep running ({shown}); rerun the same command to wait "
                     "for them again, or see --status")
            raise
        return outcome

    def _submit(self, todo: list[tuple[int, Configuration]], total: int) -> list[_Outstanding]:
        """Fresh run directories for ``todo``, then one job each (or one array); job.json for every job."""
        if not todo:
            return []
        folder = self.output_dir / SUBMITIT_DIR
        executor = make_submitit_executor(self.spec, folder, self.job_name)
        attempts = []
        for _, config in todo:
            run_dir, attempt = self.run_dir(config), uuid.uuid4().hex
            command = eval_command_for(config, run_dir, self.eval_command, self.spec.processes_per_config)
            prepare_run_dir(run_dir, config_meta(config, command, attempt=attempt, executor=self.spec.name))
            attempts.append(attempt)
        outstanding: list[_Outstanding] = []

        def submitted(item: tuple[int, Configuration], attempt: str, job) -> None:
            # job.json right away: a sweep that dies now must still find every job it submitted.
            (index, config), record = item, job_record(job, self.spec, folder, attempt)
            write_json_atomic(self.run_dir(config) / JOB_FILE, record)
            self._held.append(job)
            outstanding.append(_Outstanding(index, config, self.run_dir(config), record))
            self.say(f"configuration {index} of {total}: {config.label} [{config.run_id}] "
                     f"submitted as job {record['job_id']}")

        run_dirs = [str(self.run_dir(config)) for _, config in todo]
        try:
            if self.spec.as_array:
                for item, attempt, job in zip(todo, attempts, executor.map_array(run_configuration, run_dirs,
                                                                                 attempts)):
                    submitted(item, attempt, job)
            else:
                for item, run_dir, attempt in zip(todo, run_dirs, attempts):
                    submitted(item, attempt, executor.submit(run_configuration, run_dir, attempt))
        except Exception as err:  # sbatch refused (bad partition, account, ...): say what it said
            raise GridError(f"submitting to {self.spec.name} failed ({len(outstanding)} of {len(todo)} jobs "
                            f"submitted): {err}; rerun once it is fixed (what was submitted is not submitted "
                            "again)") from None
        return outstanding

    def _wait(self, outstanding: list[_Outstanding], total: int) -> dict[str, str]:
        outcome: dict[str, str] = {}
        started = time.monotonic()
        while outstanding:
            time.sleep(self.poll_interval)
            if self.spec.cluster == "local":
                for job in self._held:
                    job.get_info()  # polls, so reaps, the job's controller process (our child)
            # The state first, then run.json: a job writes run.json before it ends, so a job seen
            # ended without one has really produced nothing.
            states = job_states([j.record for j in outstanding])
            for item in list(outstanding):
                state = states.get(item.record["job_id"])
                ended = not is_active(state, item.record)
                if ended:
                    refresh_dir(item.run_dir)
                status = self._finished(item, state, total) if ended else None
                if status is None:
                    continue
                outstanding.remove(item)
                outcome[item.config.run_id] = status
                self.say(f"  {len(outstanding)} job(s) left; elapsed {fmt_duration(time.monotonic() - started)}")
        return outcome

    def _finished(self, item: _Outstanding, state: str | None, total: int) -> str | None:
        """'ok' / 'failed' once the ended job's outcome is known (and said), None to look again later."""
        head = (f"configuration {item.index} of {total}: {item.config.label} [{item.config.run_id}] "
                f"(job {item.record['job_id']})")
        if completed_run(item.run_dir, item.config.run_id):
            self.say(f"{head} done")
            return "ok"
        record = failed_run(item.run_dir)
        if record is not None:
            line = last_error_line(tail_text(item.run_dir / LOG_FILE))
            self.say(f"{head} FAILED: {record['error']}" + (f"; last error: {line}" if line else "")
                     + f" (log: {item.run_dir / LOG_FILE})")
            return "failed"
        now = time.monotonic()
        if item.dead_since is None:
            item.dead_since = now
        if now - item.dead_since < self.settle_s:
            return None
        what, log, line = job_failure(item.record, state)
        self.say(f"{head} FAILED: {what}" + (f"; last error: {line}" if line else "") + f" (log: {log})")
        return "failed"
