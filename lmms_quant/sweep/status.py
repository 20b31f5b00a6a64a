"""``lmms-quant sweep GRID --status``: each configuration done, running, failed or not started.

Read from the run directories alone (run.json, job.json, the logs) and, for cluster jobs, the job's
state asked of SLURM through submitit: it works while a sweep runs, after it died, and from another
machine that sees the same output directory. It takes no lock and changes nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from lmms_quant.sweep.grid import Configuration
from lmms_quant.sweep.rundir import (JOB_FILE, LOG_FILE, completed_run, failed_run, last_error_line, process_alive,
                                     read_json, refresh_dir, sweep_is_running, tail_text)

STATES = ("done", "running", "failed", "not started")


@dataclasses.dataclass
class ConfigStatus:
    config: Configuration
    state: str  # one of STATES
    job_id: str | None = None
    job_state: str | None = None  # SLURM's word for the job (RUNNING, PENDING, TIMEOUT, ...)
    what: str | None = None  # failed: what happened
    error_line: str | None = None  # failed: the last error line of the log
    log: Path | None = None


def configuration_status(output_dir: Path, configurations: Sequence[Configuration]) -> list[ConfigStatus]:
    output_dir = Path(output_dir)
    runs = output_dir / "runs"
    records = {c.run_id: read_json(runs / c.run_id / JOB_FILE) for c in configurations}
    asked = [r for c in configurations
             if (r := records[c.run_id]) and "job_id" in r and not completed_run(runs / c.run_id)]
    states: dict[str, str] = {}
    if asked:
        from lmms_quant.sweep.executors import job_states

        try:
            states = job_states(asked)
        except ImportError:  # submitit is not installed here: the jobs' states stay unknown
            states = {}
    local_sweep = output_dir.is_dir() and sweep_is_running(output_dir)
    statuses = []
    for config in configurations:
        run_dir, record = runs / config.run_id, records[config.run_id]
        refresh_dir(run_dir)
        if completed_run(run_dir, config.run_id):
            statuses.append(ConfigStatus(config, "done"))
        elif (failed := failed_run(run_dir)) is not None:
            statuses.append(ConfigStatus(config, "failed", record and record.get("job_id"), None, failed["error"],
                                         last_error_line(tail_text(run_dir / LOG_FILE)), run_dir / LOG_FILE))
        elif record is not None and "job_id" in record:
            from lmms_quant.sweep.executors import is_active, job_failure

            state = states.get(record["job_id"])
            if is_active(state, record):
                statuses.append(ConfigStatus(config, "running", record["job_id"], state or "UNKNOWN"))
            else:
                what, log, line = job_failure(record, state)
                statuses.append(ConfigStatus(config, "failed", record["job_id"], state, what, line, log))
        elif record is not None and local_sweep and process_alive(record.get("pid"), record.get("host")):
            statuses.append(ConfigStatus(config, "running", what=f"local sweep, pid {record['pid']}"))
        else:
            statuses.append(ConfigStatus(config, "not started"))
    return statuses


def print_status(output_dir: Path, statuses: Sequence[ConfigStatus], stream=None) -> None:
    stream = stream or sys.stdout
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    print(f"{output_dir}: {len(statuses)} configurations: "
          + ", ".join(f"{n} {state}" for state, n in counts.items()), file=stream)
    for status in statuses:
        line = f"  {status.state:<11}  {status.config.run_id}  {status.config.label}"
        if status.state == "running":
            line += f"  job {status.job_id} ({status.job_state})" if status.job_id else f"  ({status.what})"
        print(line, file=stream)
        if status.state == "failed":
            print(f"{'':15}{status.what}", file=stream)
            if status.error_line:
                print(f"{'':15}last error: {status.error_line}", file=stream)
            print(f"{'':15}log: {status.log}", file=stream)
    stream.flush()
