"""The run-directory protocol that the sweep writes and the leaderboard (and ``--status``) read.

One configuration, one directory, named by a hash of everything that determines its result::

    OUTPUT_DIR/runs/<id>/config.json      written first: what this directory is for
    OUTPUT_DIR/runs/<id>/job.json         cluster executors only: the job that is computing it
    OUTPUT_DIR/runs/<id>/log.txt          the `lmms-quant eval` subprocess's stdout and stderr
    OUTPUT_DIR/runs/<id>/lmms_eval/...    lmms-eval's --output_path (results, samples, our report)
    OUTPUT_DIR/runs/<id>/run.json         written last, by rename: status, timings, results file

Only ``run.json`` with ``status: ok`` (and the results file it names) marks a finished
configuration. Whoever writes it — the local sweep, or the cluster job itself — does so after the
evaluation subprocess has exited and its one results file was found, through a rename; so a process
killed at any instant (SIGKILL, a SLURM time limit, preemption) leaves nothing that looks complete,
and the next sweep deletes the directory and computes the configuration from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from lmms_quant.atomic import write_json_atomic

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
JOB_FILE = "job.json"
LOG_FILE = "log.txt"
EVAL_OUTPUT = "lmms_eval"
WEIGHT_CACHE_DIR = "weight_cache"
LOCK_FILE = "sweep.lock"


class SweepBusy(RuntimeError):
    """Another sweep holds the output directory's lock."""


def run_id_of(identity: dict) -> str:
    """The directory name of a configuration: 16 hex characters of the sha256 of its identity."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_results_files(eval_output: Path) -> list[Path]:
    """lmms-eval's aggregated results under an --output_path (never submissions/*_results.json)."""
    return sorted(p for p in Path(eval_output).glob("*/*_results.json")
                  if p.parent.name != "submissions" and re.match(r"^\d{8}_\d{6}_results\.json$", p.name))


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def completed_run(run_dir: Path, run_id: str | None = None) -> dict | None:
    """The run record of a finished configuration, or None if the directory holds no finished result."""
    record = read_json(Path(run_dir) / RUN_FILE)
    if record is None or record.get("status") != "ok":
        return None
    if run_id is not None and record.get("run_id") != run_id:
        return None
    results = record.get("results_file")
    if not results or not (Path(run_dir) / results).is_file():
        return None
    return record


def failed_run(run_dir: Path) -> dict | None:
    """The run record of a configuration whose evaluation ran and failed, or None."""
    record = read_json(Path(run_dir) / RUN_FILE)
    return record if record is not None and record.get("status") == "failed" else None


def prepare_run_dir(run_dir: Path, meta: dict) -> None:
    """Empty ``run_dir`` of any earlier attempt (nothing in it is trusted) and write its config.json."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / CONFIG_FILE, meta)


def finish_run(run_dir: Path, meta: dict, returncode: int | None, started_wall: float, duration_s: float) -> dict:
    """Decide whether the evaluation that just exited produced a result, and rename run.json into place.

    ``meta`` is the directory's config.json (what the configuration is). Returns the record.
    """
    run_dir = Path(run_dir)
    results = find_results_files(run_dir / EVAL_OUTPUT)
    error = None
    if returncode != 0:
        error = f"lmms-quant eval exited with status {returncode}"
    elif len(results) != 1:
        error = f"expected one lmms-eval results file, found {len(results)}"
    record = {
        "status": "ok" if error is None else "failed",
        "error": error,
        **{key: meta.get(key) for key in ("run_id", "label", "is_baseline", "plan_digest", "varied", "identity",
                                          "command")},
        "returncode": returncode,
        "started": started_wall,
        "finished": time.time(),
        "duration_s": round(duration_s, 3),
        "results_file": str(results[0].relative_to(run_dir)) if error is None else None,
    }
    # Renamed into place last: a finished configuration is exactly one whose run.json says ok.
    write_json_atomic(run_dir / RUN_FILE, record)
    return record


_ERROR_LINE = re.compile(r"(?i)(\w*error\b|exception|traceback|fatal|killed|cancelled|time ?limit|timed[ -]?out"
                         r"|out of memory|oom)")


def last_error_line(text: str | None, *, fallback: bool = True) -> str | None:
    """The last line of a log that reads like an error; else (``fallback``) its last non-empty line."""
    if not text:
        return None
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line
    return lines[-1] if lines and fallback else None


def tail_text(path: Path, max_bytes: int = 64 * 1024) -> str | None:
    """The end of a (possibly large) log file, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode(errors="replace")
    except OSError:
        return None


def process_alive(pid, host: str | None) -> bool:
    """Whether process ``pid`` runs (not a zombie) on this host."""
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def refresh_dir(path: Path) -> None:
    """Make an NFS client revalidate ``path`` (its cached attributes can hide a file another node wrote)."""
    with contextlib.suppress(OSError):
        Path(path).chmod(Path(path).stat().st_mode)


def eval_arguments(config, run_dir: Path) -> list[str]:
    """The `lmms-quant eval` arguments for one configuration (everything after the command itself)."""
    model_args = config.model_args
    if not config.is_baseline and "weight_cache" not in (part.split("=", 1)[0] for part in model_args.split(",")):
        # Quantized weights are kept under the sweep's output directory (on a cluster: the shared
        # filesystem), so a configuration interrupted after quantizing, or scored on other tasks later,
        # does not quantize again. Not part of the configuration (nor of its run id): where weights are
        # cached does not change results.
        model_args += f",weight_cache={Path(run_dir).resolve().parent.parent / WEIGHT_CACHE_DIR}"
    argv = ["--model", config.model, "--model_args", model_args, "--tasks", ",".join(config.tasks),
            "--output_path", str(Path(run_dir) / EVAL_OUTPUT), "--log_samples"]
    if config.limit is not None:
        argv += ["--limit", str(config.limit)]
    if config.batch_size is not None:
        argv += ["--batch_size", str(config.batch_size)]
    if config.seed is not None:
        argv += ["--seed", config.seed]
    if config.data_root is not None:
        argv += ["--data-root", config.data_root]
    return argv


def default_eval_command() -> list[str]:
    return [sys.executable, "-m", "lmms_quant.cli", "eval"]


def accelerate_launcher(processes: int) -> list[str]:
    """The command prefix that runs `lmms-quant eval` as ``processes`` data-parallel processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "-m", "lmms_quant.cli"]


def eval_command_for(config, run_dir: Path, eval_command: Sequence[str] | None, processes: int = 1) -> list[str]:
    """The full command that evaluates ``config`` into ``run_dir``, locally or in a cluster job."""
    if processes > 1:  # accelerate runs `python -m lmms_quant.cli eval ...` in each process
        return [*accelerate_launcher(processes), "eval", *eval_arguments(config, run_dir)]
    return [*(eval_command or default_eval_command()), *eval_arguments(config, run_dir)]


def config_meta(config, command: Sequence[str], **extra) -> dict:
    """What config.json says about a configuration (and run.json repeats)."""
    return {"run_id": config.run_id, "label": config.label, "is_baseline": config.is_baseline,
            "plan_digest": config.plan_digest, "varied": dict(config.varied), "identity": config.identity(),
            "command": list(command), **extra}


@contextlib.contextmanager
def sweep_lock(output_dir: Path) -> Iterator[None]:
    """Hold OUTPUT_DIR/sweep.lock: two sweeps never start, delete or submit in one directory at once."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusy(f"another sweep is running in {output_dir} (it holds {LOCK_FILE})") from None
        yield


def sweep_is_running(output_dir: Path) -> bool:
    """Whether a sweep process holds OUTPUT_DIR's lock now (for --status: creates nothing, holds nothing)."""
    path = Path(output_dir) / LOCK_FILE
    try:
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return False
