"""``lmms-quant sweep GRID.yaml``: arguments, and the choice between the local and the cluster executors."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from lmms_quant.sweep.executors import EXECUTORS, ExecutorUnavailable, check_available
from lmms_quant.sweep.grid import GridError, load_grid
from lmms_quant.sweep.rundir import completed_run
from lmms_quant.sweep.scheduler import SweepRunner, detect_gpus, make_slots


def _parse_gpus(text: str) -> list[int]:
    if text == "auto":
        return detect_gpus()
    if text in ("none", "cpu", ""):
        return []
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise GridError(f"--gpus: {text!r} must be 'auto', 'none' or a comma-separated list of GPU ids") from None
    if len(set(gpus)) != len(gpus) or any(g < 0 for g in gpus):
        raise GridError(f"--gpus: {text!r} lists a GPU twice or a negative id")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmms-quant sweep",
        description="Run a grid of quantization configurations through lmms-eval, on this machine or as SLURM "
                    "jobs; rerun the same command to resume.")
    parser.add_argument("grid", help="grid YAML file (see `python -m pydoc lmms_quant.sweep.grid`)")
    parser.add_argument("--output-dir", default=None, help="overrides the grid's output_dir")
    parser.add_argument("--executor", choices=list(EXECUTORS), default=None,
                        help="overrides the grid's executor.name: " + "; ".join(f"{k}: {v}" for k, v in EXECUTORS.items()))
    parser.add_argument("--status", action="store_true",
                        help="show each configuration's state (done, running, failed, not started); run nothing")
    parser.add_argument("--no-wait", action="store_true",
                        help="slurm/submitit-local: submit what is missing and return instead of waiting for the jobs")
    parser.add_argument("--gpus", default="auto",
                        help="local executor: 'auto' (CUDA_VISIBLE_DEVICES / all visible), 'none', or ids like 0,1,2,3")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the configurations; run nothing")
    parser.add_argument("--eval-command", default=None,
                        help="command that evaluates one configuration (default: this Python's "
                             "`-m lmms_quant.cli eval`); the eval arguments are appended")
    parser.add_argument("--fork", choices=("auto", "on", "off"), default="auto",
                        help="local executor: evaluate each configuration in a fork of a process that imported "
                             "lmms-eval once (saves ~10 s a configuration); auto = on when running on the CPU only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        grid = load_grid(args.grid, output_dir=args.output_dir, executor=args.executor)
        spec = grid.executor
        slots = None if spec.uses_submitit else make_slots(_parse_gpus(args.gpus), grid.processes_per_config)
    except GridError as err:
        print(f"lmms-quant sweep: {err}", file=sys.stderr)
        return 2
    if args.status:
        from lmms_quant.sweep.status import configuration_status, print_status

        print_status(grid.output_dir, configuration_status(grid.output_dir, grid.configurations))
        return 0
    eval_command = shlex.split(args.eval_command) if args.eval_command else None
    if eval_command and shutil.which(eval_command[0]) is None:
        print(f"lmms-quant sweep: --eval-command: {eval_command[0]!r} is not an executable", file=sys.stderr)
        return 2
    n = len(grid.configurations)
    if spec.uses_submitit:
        where = f"as {spec.name} jobs through submitit" + (" (one job array)" if spec.as_array else "")
    else:
        where = f"on {len(slots)} slot(s): {', '.join(map(str, slots))}"
    print(f"{n} configurations ({n - 1} + the fp16 baseline) {where}; output {grid.output_dir}", flush=True)
    if args.dry_run:
        for i, config in enumerate(grid.configurations, 1):
            done = " (complete)" if completed_run(grid.output_dir / "runs" / config.run_id, config.run_id) else ""
            print(f"  {i:>4}  {config.run_id}  {config.label}{done}")
        return 0
    if spec.uses_submitit:
        try:
            check_available(spec)  # before anything is written or submitted
        except ExecutorUnavailable as err:
            print(f"lmms-quant sweep: {err}", file=sys.stderr)
            return 2
        from lmms_quant.sweep.cluster import SubmititRunner

        stem = Path(args.grid).stem
        runner = SubmititRunner(grid.output_dir, spec, eval_command=eval_command, wait=not args.no_wait,
                                job_name=f"lmms-quant-{stem}")
    else:
        fork = args.fork == "on" or (args.fork == "auto" and not any(slot.gpus for slot in slots))
        runner = SweepRunner(grid.output_dir, slots=slots, eval_command=eval_command, fork=fork)
    try:
        outcome = runner.run(grid.configurations)
    except GridError as err:
        print(f"lmms-quant sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmms-quant sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    failed = [run_id for run_id, status in outcome.items() if status == "failed"]
    running = [run_id for run_id, status in outcome.items() if status == "running"]
    complete = sum(status in ("ok", "skipped") for status in outcome.values())
    print(f"{complete} of {n} configurations complete"
          + (f"; {len(running)} running (see --status)" if running else "")
          + (f"; {len(failed)} failed (rerun to retry): {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
