"""What one cluster job runs: a configuration's `lmms-quant eval`, from its config.json to its run.json.

submitit pickles :func:`run_configuration` by reference, so this module imports light (no torch, no
submitit). It does for one configuration what the local sweep does — the same command, the same run
directory, the same run.json through a rename — because the sweep that submitted it may be gone by
the time the job runs, or may never see the node the job runs on.

A job killed at any instant (SIGKILL, the time limit, preemption, a node failure) writes no run.json,
so nothing of it counts as a result. Each submission carries an attempt token that the sweep also
wrote into config.json: a job whose token is no longer the directory's (the sweep took it for dead and
resubmitted the configuration) leaves the directory alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lmms_quant.sweep.rundir import (CONFIG_FILE, EVAL_OUTPUT, LOG_FILE, RUN_FILE, completed_run, finish_run,
                                     last_error_line, read_json, tail_text)


class EvaluationFailed(RuntimeError):
    """The evaluation ran and produced no result; run.json says why (raised so that SLURM says FAILED)."""


def die_with_parent(parent_pid: int) -> None:
    """In the child before exec: get SIGKILLed when its parent dies, so no orphan writes into a run dir."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _owns(run_dir: Path, attempt: str) -> bool:
    meta = read_json(run_dir / CONFIG_FILE)
    return meta is not None and meta.get("attempt") == attempt


def run_configuration(run_dir: str, attempt: str) -> dict:
    """Evaluate the configuration of ``run_dir`` (its config.json names the command); return run.json's record.

    Raises EvaluationFailed when the evaluation failed (run.json then says ``failed`` and why).
    """
    run_dir = Path(run_dir)
    meta = read_json(run_dir / CONFIG_FILE)
    superseded = {"status": "superseded", "run_dir": str(run_dir), "attempt": attempt}
    if meta is None or meta.get("attempt") != attempt:
        return superseded
    done = completed_run(run_dir, meta["run_id"])
    if done is not None:  # requeued after it had finished
        return done
    # Requeued after preemption: this attempt starts again from nothing.
    shutil.rmtree(run_dir / EVAL_OUTPUT, ignore_errors=True)
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    command = list(meta["command"])
    started_wall, started = time.time(), time.monotonic()
    with open(run_dir / LOG_FILE, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=functools.partial(die_with_parent, os.getpid()))
        try:
            returncode = process.wait()
        finally:
            if process.poll() is None:  # the job is being stopped (time limit, preemption): stop the evaluation
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if not _owns(run_dir, attempt):
        return superseded
    record = finish_run(run_dir, meta, returncode, started_wall, time.monotonic() - started)
    if record["status"] != "ok":
        line = last_error_line(tail_text(run_dir / LOG_FILE))
        raise EvaluationFailed(f"{meta.get('label')} [{meta.get('run_id')}]: {record['error']}"
                               + (f"; last error: {line}" if line else "") + f"; log: {run_dir / LOG_FILE}")
    return record
