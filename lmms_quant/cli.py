"""``lmms-quant``: the console command.

Sub-commands are thin: each parses its own arguments and calls into the library. Every sub-command
returns a process exit code, and any failure is non-zero (lmms-eval's own CLI exits 0 when an
evaluation fails, which would let a sweep take a crash for a result).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

SUBCOMMANDS = {
    "eval": ("lmms_quant.cli", "eval_main", "run lmms-eval with lmms-quant's tasks; non-zero exit on failure"),
    "tasks-path": ("lmms_quant.cli", "tasks_path_main", "print the --include_path directory of lmms-quant's tasks"),
    "make-data": ("lmms_quant.cli", "make_data_main", "write the synthetic datasets the *_local tasks read"),
    "make-fixtures": ("lmms_quant.cli", "make_fixtures_main", "write tiny hub-free checkpoints, one directory per model family"),
    "quantize": ("lmms_quant.quant.cli", "main", "quantize a model by a plan and write the report, without evaluating"),
    "inspect": ("lmms_quant.quant.inspect", "main", "a model's components and the exact tensors a plan would quantize"),
    "export": ("lmms_quant.quant.export", "main", "write a saved quantized run as a compressed-tensors (vLLM) checkpoint"),
    "demo": ("lmms_quant.demo", "main", "the shipped tiny VLMs through lmms-eval at FP16 and a quantization grid"),
    "sweep": ("lmms_quant.sweep", "main", "run a grid of configurations (resumable) from a grid YAML"),
    "leaderboard": ("lmms_quant.leaderboard", "main", "Markdown/CSV/HTML leaderboard of a runs directory"),
    "weight-cache": ("lmms_quant.weight_cache", "main", "list, verify or clear a cache of quantized weights"),
}


def _usage() -> str:
    lines = ["usage: lmms-quant <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"lmms-quant: unknown command {command!r}; valid commands: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[command]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


# --------------------------------------------------------------------------- tasks-path / data

def tasks_path_main(argv: list[str]) -> int:
    from lmms_quant.tasks_path import default_data_root, render_tasks

    parser = argparse.ArgumentParser(prog="lmms-quant tasks-path", description="Render lmms-quant's task YAMLs "
                                     "for a data root and print the directory to pass as lmms-eval --include_path.")
    parser.add_argument("--data-root", default=None, help=f"where *_local tasks read data (default {default_data_root()})")
    args = parser.parse_args(argv)
    print(render_tasks(args.data_root))
    return 0


def make_data_main(argv: list[str]) -> int:
    from lmms_quant.fixtures.datasets import write_lmms_eval_datasets
    from lmms_quant.tasks_path import default_data_root

    parser = argparse.ArgumentParser(prog="lmms-quant make-data")
    parser.add_argument("--root", default=None, help=f"output directory (default {default_data_root()})")
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.root or default_data_root())
    written = dict(write_lmms_eval_datasets(root, n_images=args.n_images, seed=args.seed))
    try:
        from lmms_quant.fixtures.retrieval_data import write_retrieval_datasets
    except ImportError:
        pass
    else:
        written.update(write_retrieval_datasets(root, n_images=args.n_images, seed=args.seed))
    for task, path in sorted(written.items()):
        print(f"{task}: {path}")
    return 0


def make_fixtures_main(argv: list[str]) -> int:
    from lmms_quant.fixtures.models import FIXTURE_BUILDERS

    parser = argparse.ArgumentParser(prog="lmms-quant make-fixtures")
    parser.add_argument("out_dir")
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURE_BUILDERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.only or sorted(FIXTURE_BUILDERS):
        print(f"{name}: {FIXTURE_BUILDERS[name](Path(args.out_dir) / name, seed=args.seed)}")
    return 0


# --------------------------------------------------------------------------- eval

def canonical_model_args(model_id: str, model_args: str) -> str:
    """Validate an lmms-quant model's arguments and spell out every quantization setting.

    lmms-eval's response cache and results files know a configuration only by the ``model_args``
    string. Folding the resolved plan (defaults included) and the lmms-quant version into it means two
    configurations can never share cached responses, even across versions with other defaults.
    """
    from lmms_quant.model_ids import MODEL_CLASSES, model_class

    if model_id not in MODEL_CLASSES:
        return model_args
    return model_class(model_id).canonical_model_args(model_args)


def _missing_local_data(include_dir: Path, tasks: str | None) -> list[str]:
    from lmms_quant.tasks_path import local_task_data_files

    needed = local_task_data_files(include_dir)
    problems = []
    for task in (tasks or "").split(","):
        for path in needed.get(task.strip(), []):
            if not path.exists():
                problems.append(f"{task}: {path}")
    return problems


def eval_main(argv: list[str]) -> int:
    """lmms-eval's CLI with lmms-quant's tasks on the include path and an honest exit status."""
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--data-root", default=None)
    own, lmms_eval_argv = ours.parse_known_args(argv)

    from lmms_quant.tasks_path import render_tasks

    include_dir = render_tasks(own.data_root)
    from lmms_eval.__main__ import parse_eval_args  # slow import (~10 s): only after our own checks

    saved_argv = sys.argv
    sys.argv = ["lmms-eval", *lmms_eval_argv]
    try:
        _, args = parse_eval_args()
    finally:
        sys.argv = saved_argv
    if not args.tasks:
        print("lmms-quant eval: --tasks is required", file=sys.stderr)
        return 2
    if args.config:
        print("lmms-quant eval: --config is not supported; use `lmms-quant sweep` for several configurations",
              file=sys.stderr)
        return 2
    try:
        args.model_args = canonical_model_args(args.model, args.model_args or "")
    except ValueError as err:
        print(f"lmms-quant eval: {err}", file=sys.stderr)
        return 2
    missing = _missing_local_data(include_dir, args.tasks)
    if missing:
        print("lmms-quant eval: local task data missing (run `lmms-quant make-data` or pass --data-root):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return 2
    args.include_path = [str(include_dir)] + ([args.include_path] if args.include_path else [])
    # The model wrappers read --output_path from the command line to put the quantization report
    # beside lmms-eval's results; keep the command line what lmms-eval itself would have seen.
    sys.argv = ["lmms-eval", *lmms_eval_argv]
    return _run_lmms_eval(args)


def _run_lmms_eval(args) -> int:
    import traceback

    from lmms_eval.__main__ import cli_evaluate_single
    from lmms_eval.utils import make_table
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=args.verbosity)
    os.environ["VERBOSITY"] = args.verbosity
    try:
        results, _ = cli_evaluate_single(args)
    except SystemExit as exit_:  # lmms-eval exits (code None) after `--tasks list`-style listings
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:
        traceback.print_exc()
        print("lmms-quant eval: evaluation failed", file=sys.stderr)
        return 1
    if results is None:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print("lmms-quant eval: lmms-eval returned no results", file=sys.stderr)
            return 1
        return 0
    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
