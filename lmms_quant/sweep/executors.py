"""The grid's ``executor`` section: where configurations run, validated, and turned into a submitit executor.

::

    executor:
      name: slurm                  # local (default) | slurm | submitit-local
      timeout_min: 240             # the job's time limit (required for slurm)
      gpus_per_node: 1             # GPUs per job (default: processes_per_config)
      cpus_per_task: 8
      mem_gb: 64
      slurm_partition: gpu
      slurm_account: my-project
      slurm_qos: normal
      slurm_constraint: a100
      slurm_array_parallelism: 16  # one job array, at most 16 running at once (default: one job each)
      slurm_additional_parameters: {exclusive: true, mail-type: FAIL}   # more sbatch flags
      slurm_setup: ["module load cuda/12.4"]                            # shell lines before the job

The keys are submitit's own (``AutoExecutor.update_parameters``) and are passed through unchanged, so
submitit's documentation describes them; ``local`` ignores them. ``submitit-local`` runs the SLURM
code path on this machine — each configuration a detached job of submitit's ``LocalExecutor`` — to
try a cluster grid before submitting it (and to test that path).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

EXECUTORS = {
    "local": "this machine: one configuration per GPU (or on the CPU) at a time",
    "slurm": "one SLURM job per configuration (or one job array), submitted through submitit",
    "submitit-local": "the slurm path on this machine: each configuration a detached submitit LocalExecutor job",
}
SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local"}


def _int(minimum: int):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"must be an integer >= {minimum}"
        return None
    return check


def _positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return "must be a number > 0"
    return None


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _lines(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        return "must be a list of shell command strings"
    return None


# sbatch flags that submitit itself sets and relies on (its logs, the array, the timeout signal), and
# those that have a key of their own above.
_SUBMITIT_FLAGS = {"array", "output", "error", "open-mode", "signal", "wckey", "job-name", "nodes", "ntasks-per-node"}
_OWN_KEY = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos", "time": "timeout_min",
            "mem": "mem_gb", "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task",
            "constraint": "slurm_constraint"}
_SBATCH_FLAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _sbatch_flags(value: Any) -> str | None:
    if not isinstance(value, dict) or not value:
        return "must be a mapping of sbatch flag -> value, e.g. {exclusive: true, mail-type: FAIL}"
    for flag, setting in value.items():
        name = str(flag).replace("_", "-")
        if not isinstance(flag, str) or not _SBATCH_FLAG.match(flag):
            return f"{flag!r} is not an sbatch flag name"
        if name in _SUBMITIT_FLAGS:
            return f"{flag!r} is set by submitit itself and cannot be overridden"
        if name in _OWN_KEY:
            return f"{flag!r} has its own key: give it as executor.{_OWN_KEY[name]}"
        if setting is not True and (isinstance(setting, bool) or not isinstance(setting, (str, int, float))):
            return f"{flag}: value {setting!r} must be a string, a number or true (a flag without value)"
    return None


EXECUTOR_KEYS = {  # key -> (what it is, its check)
    "name": (f"where configurations run: {', '.join(EXECUTORS)}", None),
    "timeout_min": ("time limit of one job in minutes (required for slurm; submitit would ask for 5)", _int(1)),
    "gpus_per_node": ("GPUs per job (default: processes_per_config)", _int(0)),
    "cpus_per_task": ("CPUs per job", _int(1)),
    "mem_gb": ("memory per job, GB", _positive_number),
    "slurm_partition": ("sbatch --partition", _text),
    "slurm_account": ("sbatch --account", _text),
    "slurm_qos": ("sbatch --qos", _text),
    "slurm_constraint": ("sbatch --constraint", _text),
    "slurm_array_parallelism": ("submit one job array running at most this many configurations at once "
                                "(default: one job per configuration)", _int(1)),
    "slurm_additional_parameters": ("mapping of further sbatch flags", _sbatch_flags),
    "slurm_setup": ("list of shell lines the job runs before the evaluation", _lines),
}
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit-local without a timeout_min: practically none


@dataclasses.dataclass(frozen=True)
class ExecutorSpec:
    """A validated executor section: its name and submitit's parameters (sorted key, value pairs)."""

    name: str = "local"
    params: tuple[tuple[str, Any], ...] = ()
    processes_per_config: int = 1

    @property
    def uses_submitit(self) -> bool:
        return self.name in SUBMITIT_CLUSTER

    @property
    def cluster(self) -> str:
        """submitit's name of the executor (AutoExecutor's ``cluster``)."""
        return SUBMITIT_CLUSTER[self.name]

    @property
    def as_array(self) -> bool:
        return "slurm_array_parallelism" in dict(self.params)

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """What AutoExecutor.update_parameters gets: one task on one node per configuration."""
        params = {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.params}
        if "slurm_additional_parameters" in params:
            params["slurm_additional_parameters"] = dict(params["slurm_additional_parameters"])
        params.setdefault("gpus_per_node", self.processes_per_config)
        if params["gpus_per_node"] == 0:  # a CPU job: ask for no GPUs rather than for zero of them
            del params["gpus_per_node"]
        params.setdefault("timeout_min", LOCAL_TIMEOUT_MIN)  # only reachable for submitit-local
        return {"name": job_name, "nodes": 1, "tasks_per_node": 1, **params}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, list):
        return tuple(value)
    return value


def parse_executor(section: Any, *, processes_per_config: int = 1, name: str | None = None) -> ExecutorSpec:
    """Validate a grid's ``executor`` section (``name`` overrides its name: ``--executor``).

    Raises ValueError naming the key, the value and the valid choices.
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"executor: expected a mapping, got {section!r}")
    for key, value in section.items():
        if key not in EXECUTOR_KEYS:
            close = difflib.get_close_matches(str(key), list(EXECUTOR_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"executor: unknown key {key!r} (value {value!r}){hint}; valid keys: "
                             + ", ".join(EXECUTOR_KEYS))
        check = EXECUTOR_KEYS[key][1]
        problem = check(value) if check is not None else None
        if problem:
            raise ValueError(f"executor.{key}: value {value!r} {problem}")
    chosen = name if name is not None else section.get("name", "local")
    if chosen not in EXECUTORS:
        where = "--executor" if name is not None else "executor.name"
        raise ValueError(f"{where}: unknown executor {chosen!r}; valid: {', '.join(EXECUTORS)}")
    if chosen == "slurm" and "timeout_min" not in section:
        raise ValueError("executor.timeout_min: required for slurm (the time limit of one job in minutes; "
                         "submitit would otherwise ask SLURM for 5)")
    gpus = section.get("gpus_per_node")
    if gpus is not None and processes_per_config > 1 and gpus < processes_per_config:
        raise ValueError(f"executor.gpus_per_node: value {gpus} is fewer than processes_per_config "
                         f"({processes_per_config}): each configuration needs that many GPUs")
    params = tuple(sorted((k, _freeze(v)) for k, v in section.items() if k != "name"))
    return ExecutorSpec(chosen, params, processes_per_config)


# --------------------------------------------------------------------------- submitting


class ExecutorUnavailable(RuntimeError):
    """This machine cannot run the chosen executor (no sbatch, no submitit)."""


def check_available(spec: ExecutorSpec) -> None:
    """Fail before anything is submitted when the executor cannot work here."""
    if not spec.uses_submitit:
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ExecutorUnavailable(f"executor {spec.name}: submitit is not installed; "
                                  "pip install 'lmms-quant[slurm]'") from None
    if spec.cluster == "slurm":
        # sbatch submits, srun starts the job step (submitit refuses to work without it), sacct tells a
        # running job from a dead one when a later sweep resumes.
        missing = [command for command in ("sbatch", "srun", "sacct") if shutil.which(command) is None]
        if missing:
            raise ExecutorUnavailable(
                f"executor slurm: {', '.join(missing)} not found on PATH; nothing was submitted. Run the sweep "
                "on a SLURM login node, or choose another executor (--executor local)")


def make_submitit_executor(spec: ExecutorSpec, folder: Path, job_name: str):
    """submitit's AutoExecutor for ``spec``, its job logs under ``folder/<job id>/``."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=spec.cluster)
    executor.update_parameters(**spec.submitit_parameters(job_name))
    return executor


# --------------------------------------------------------------------------- telling running from dead

# SLURM states of a job that may still compute (or be requeued by submitit after preemption).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "READY"}
# sacct knows a job only some seconds after sbatch returned; until then it is UNKNOWN.
UNKNOWN_GRACE_S = 600


def job_record(job, spec: ExecutorSpec, folder: Path, attempt: str) -> dict:
    """What job.json holds: enough to find the job again from another sweep process."""
    return {"job_id": str(job.job_id), "executor": spec.name, "cluster": spec.cluster,
            "folder": str(Path(folder) / "%j"), "attempt": attempt, "submitted": time.time(),
            "host": socket.gethostname()}


def submitit_job(record: dict):
    """submitit's job object for a job.json record (state, paths, exception)."""
    import submitit

    job_class = submitit.SlurmJob if record["cluster"] == "slurm" else submitit.LocalJob
    return job_class(folder=record["folder"], job_id=record["job_id"])


def _local_controller_alive(record: dict) -> bool:
    """A submitit-local job is alive while its controller process (pid = job id) runs on this host."""
    from lmms_quant.sweep.rundir import process_alive

    if record.get("host") != socket.gethostname():
        return True  # cannot be checked from here; never resubmit what may be running elsewhere
    if not process_alive(int(record["job_id"]), record.get("host")):
        return False
    try:
        cmdline = Path(f"/proc/{record['job_id']}/cmdline").read_bytes()
    except OSError:
        return False
    folder = str(Path(record["folder"]).parent).encode()
    return b"submitit.local._local" in cmdline and folder in cmdline


def job_states(records: list[dict]) -> dict[str, str]:
    """job id -> state, SLURM's word (PENDING, RUNNING, TIMEOUT, CANCELLED by 0, ... UNKNOWN), asked of
    sacct once for all jobs through submitit's job objects; for submitit-local jobs RUNNING or EXITED."""
    states: dict[str, str] = {}
    slurm = [r for r in records if r.get("cluster") == "slurm"]
    if slurm:
        jobs = [submitit_job(r) for r in slurm]
        jobs[0].watcher.update()  # one sacct call for every registered job
        for record, job in zip(slurm, jobs):
            states[record["job_id"]] = job.watcher.get_state(record["job_id"], mode="cache")
    for record in records:
        if record.get("cluster") == "local":
            states[record["job_id"]] = "RUNNING" if _local_controller_alive(record) else "EXITED"
    return states


def is_active(state: str | None, record: dict, now: float | None = None) -> bool:
    word = (state or "UNKNOWN").split()[0].upper()
    if word == "UNKNOWN":
        return (now or time.time()) - float(record.get("submitted", 0)) < UNKNOWN_GRACE_S
    return word in ACTIVE_STATES


def job_failure(record: dict, state: str | None) -> tuple[str, Path | None, str | None]:
    """(what happened, the log to read, its last error line) for a job that ended without run.json."""
    from lmms_quant.sweep.rundir import last_error_line, tail_text

    job = submitit_job(record)
    what = f"job {record['job_id']} ended ({state or 'UNKNOWN'}) without a result"
    if job.paths.result_pickle.exists():  # the job's function raised: submitit pickled the traceback
        error = job.exception()
        return what, job.paths.stderr, last_error_line(str(error)) if error is not None else None
    # submitit's own log: only a line that reads like an error (its last line is routine bookkeeping)
    return what, job.paths.stderr, last_error_line(tail_text(job.paths.stderr), fallback=False)
