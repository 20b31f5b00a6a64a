"""``lmms-quant sweep GRID.yaml``: a grid of quantization configurations, run through lmms-eval, resumably.

- :mod:`.grid` — the grid file's schema, its expansion into configurations, validation of all of them
  before anything runs;
- :mod:`.rundir` — the run-directory protocol (config.json first, run.json last by rename) that the
  sweep writes and the leaderboard reads;
- :mod:`.scheduler` — the local executor: GPU slots, forks, subprocesses on this machine;
- :mod:`.executors`, :mod:`.cluster`, :mod:`.job` — the ``executor`` section, and sweeps beyond one
  machine as SLURM jobs through submitit, with the same resume guarantees;
- :mod:`.status` — ``--status``; :mod:`.cli` — ``lmms-quant sweep`` itself.
"""

from lmms_quant.sweep.cli import main
from lmms_quant.sweep.executors import ExecutorSpec, ExecutorUnavailable, parse_executor
from lmms_quant.sweep.grid import (BASELINE_ARGS, GRID_KEYS, Configuration, ConfigurationChecker, Grid, GridError,
                                   expand, known_task_names, load_grid, parse_plan)
from lmms_quant.sweep.rundir import (CONFIG_FILE, EVAL_OUTPUT, JOB_FILE, LOG_FILE, RUN_FILE, WEIGHT_CACHE_DIR,
                                     completed_run, default_eval_command, eval_arguments, find_results_files,
                                     run_id_of)
from lmms_quant.sweep.scheduler import ForkedEval, Progress, Slot, SweepRunner, detect_gpus, make_slots, preload_eval

__all__ = [
    "BASELINE_ARGS", "CONFIG_FILE", "Configuration", "ConfigurationChecker", "EVAL_OUTPUT", "ExecutorSpec",
    "ExecutorUnavailable", "ForkedEval", "GRID_KEYS", "Grid", "GridError", "JOB_FILE", "LOG_FILE", "Progress",
    "RUN_FILE", "Slot", "SweepRunner", "WEIGHT_CACHE_DIR", "completed_run", "default_eval_command", "detect_gpus",
    "eval_arguments", "expand", "find_results_files", "known_task_names", "load_grid", "main", "make_slots",
    "parse_executor", "parse_plan", "preload_eval", "run_id_of",
]
