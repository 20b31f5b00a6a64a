"""``lmms-quant sweep GRID.yaml``: a grid of quantization configurations, run through lmms-eval, resumably.

A grid file names one model, its fixed arguments, the tasks, and the axes to vary::

    model: quant_blip2
    model_args: {pretrained: Salesforce/blip2-opt-2.7b, dtype: float16}
    tasks: [coco2017_cap_val_local, vqav2_val_local]
    limit: null                  # optional: lmms-eval --limit (a count, or a fraction in (0, 1))
    batch_size: 8                # optional: lmms-eval --batch_size
    seed: "0,1234,1234,1234"     # optional: lmms-eval --seed
    data_root: /data/lmms        # optional: where the *_local tasks read their parquet files
    output_dir: runs/blip2       # optional: default runs/<grid file stem>

Relative paths (data_root, output_dir, a pretrained starting with ./ ../ or ~) are relative to the
grid file.
    processes_per_config: 1      # optional: >1 runs one configuration on several GPUs via accelerate
    axes:                        # the product of these lists
      method: [rtn, gptq]
      bits: [3, 4, 8]
    exclude:                     # optional: drop product members that match every key given
      - {method: rtn, bits: 3}
    include:                     # optional: explicit extra configurations (never excluded)
      - {method: awq, bits: 4}

The FP16 baseline (``method: fp16``) is always added. Every key and value is checked before anything
runs: the plan keys of every expanded configuration go through the engine's ``QuantPlan.from_kwargs``
(and the model wrapper's own argument check when it is importable), so a typo fails in a second, not
after hours of finished configurations.

Each configuration runs as a ``lmms-quant eval`` subprocess in its own directory, named by a hash of
everything that determines its result (model, canonical model_args, tasks, limit, batch size, seed,
data root, versions)::

    OUTPUT_DIR/runs/<id>/config.json      written first: what this directory is for
    OUTPUT_DIR/runs/<id>/log.txt          the subprocess's stdout and stderr
    OUTPUT_DIR/runs/<id>/lmms_eval/...    lmms-eval's --output_path (results, samples, our report)
    OUTPUT_DIR/runs/<id>/run.json         written last, by rename: status, timings, results file

Only ``run.json`` with ``status: ok`` marks a finished configuration. A directory without it is a
configuration that was interrupted (or is running now); the next sweep deletes it and runs the
configuration from scratch. Because ``run.json`` is renamed into place after the subprocess has exited
and its results were found, a sweep killed at any instant (SIGKILL included) leaves nothing that looks
complete. A lock on OUTPUT_DIR keeps two sweeps from working in one directory at once.

With several GPUs, configurations run in parallel, one subprocess per GPU (``CUDA_VISIBLE_DEVICES``),
or one per group of ``processes_per_config`` GPUs launched with ``accelerate launch`` (lmms-eval's own
data parallelism).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from lmms_quant.atomic import write_json_atomic
from lmms_quant.model_ids import MODEL_CLASSES, model_class

GRID_KEYS = {
    "model": "lmms-eval model id of an lmms-quant wrapper (quant_blip2, quant_llava, quant_blip2_itm)",
    "model_args": "mapping of fixed model arguments (pretrained, dtype, fixed plan keys, ...)",
    "tasks": "list of lmms-eval task names",
    "axes": "mapping of model argument -> list of values; the sweep runs their product",
    "include": "list of mappings: explicit extra configurations",
    "exclude": "list of mappings: product members to skip (a member matching every key given)",
    "limit": "lmms-eval --limit: a count >= 1 or a fraction in (0, 1); null for all documents",
    "batch_size": "lmms-eval --batch_size (an integer >= 1)",
    "seed": "lmms-eval --seed, e.g. '0,1234,1234,1234'",
    "data_root": "directory the *_local tasks read their parquet files from",
    "output_dir": "where runs/ is written (default runs/<grid file stem> beside the grid file)",
    "processes_per_config": "GPUs (accelerate processes) per configuration; default 1",
}
BASELINE_ARGS = {"method": "fp16"}
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
EVAL_OUTPUT = "lmms_eval"
_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class GridError(ValueError):
    """A grid file that cannot run; the message names the offending key and value."""


# --------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of the grid: everything that determines its lmms-eval result."""

    model: str
    model_args: str  # canonical: what `lmms-quant eval` gets and what the run id hashes
    tasks: tuple[str, ...]
    varied: tuple[tuple[str, Any], ...]  # the keys that distinguish it inside its grid (for labels)
    is_baseline: bool
    plan_digest: str | None
    limit: float | int | None = None
    batch_size: int | None = None
    seed: str | None = None
    data_root: str | None = None

    def identity(self) -> dict:
        return {
            "model": self.model,
            "model_args": self.model_args,
            "tasks": sorted(self.tasks),
            "limit": self.limit,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "data_root": self.data_root,
            "lmms_quant": _version("lmms-quant"),
            "lmms_eval": _version("lmms-eval"),
        }

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        if self.is_baseline:
            return " ".join(["fp16 baseline", *(f"{k}={_render_value(v)}" for k, v in self.varied)])
        return " ".join(f"{key}={_render_value(value)}" for key, value in self.varied) or "fixed arguments"


@dataclasses.dataclass(frozen=True)
class Grid:
    path: Path | None
    configurations: tuple[Configuration, ...]
    output_dir: Path
    processes_per_config: int = 1


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_scalar(where: str, key: str, value: Any) -> None:
    if not isinstance(key, str) or not _ARG_KEY.match(key):
        raise GridError(f"{where}: {key!r} is not a valid model argument name")
    if value is None or isinstance(value, (list, dict, tuple, set)):
        raise GridError(f"{where}.{key}: value {value!r} must be a single string, number or boolean")
    text = _render_value(value)
    if "," in text or "=" in text or not text.strip():
        raise GridError(f"{where}.{key}: value {value!r} cannot be passed in model_args "
                        "(empty, or contains ',' or '=')")


def _mapping(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping, got {value!r}")
    return value


def _list_of_mappings(where: str, value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise GridError(f"{where}: expected a list of mappings, got {value!r}")
    return [_mapping(f"{where}[{i}]", item) for i, item in enumerate(value)]


@functools.lru_cache(maxsize=1)
def known_task_names() -> frozenset[str]:
    """Task, group and tag names that lmms-eval can resolve with lmms-quant's tasks on the include path.

    A text scan of the YAML files (a fraction of a second) instead of lmms-eval's TaskManager, which
    takes ~20 s to index its 300+ task directories.
    """
    from lmms_quant.tasks_path import lmms_eval_tasks_dir, shipped_tasks_dir

    names: set[str] = set()
    scalar = re.compile(r"^(?:task|group|tag):\s*['\"]?([^\s'\"#]+)")
    for root in (shipped_tasks_dir(), lmms_eval_tasks_dir()):
        for path in root.rglob("*.yaml"):
            in_tag_list = False
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                match = scalar.match(line)
                if match:
                    names.add(match.group(1))
                    in_tag_list = False
                elif re.match(r"^(tag|task):\s*$", line):
                    in_tag_list = True
                elif in_tag_list and (item := re.match(r"^\s*-\s*['\"]?([^\s'\"#]+)", line)):
                    names.add(item.group(1))
                elif line and not line[0].isspace():
                    in_tag_list = False
    return frozenset(names)


def _validate_tasks(value: Any, known: Callable[[], set[str]]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",")]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise GridError(f"tasks: expected a non-empty list of task names, got {value!r}")
    tasks = tuple(dict.fromkeys(t.strip() for t in value))
    names = known()
    for task in tasks:
        if task not in names:
            close = difflib.get_close_matches(task, sorted(names), n=5)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise GridError(f"tasks: unknown task {task!r}{hint}")
    return tasks


def _validate_limit(value: Any) -> float | int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GridError(f"limit: value {value!r} must be a count >= 1, a fraction in (0, 1), or null")
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)
    if not (isinstance(value, int) and value >= 1) and not (isinstance(value, float) and 0 < value < 1):
        raise GridError(f"limit: value {value!r} must be a count >= 1, a fraction in (0, 1), or null")
    return value


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GridError(f"{key}: value {value!r} must be an integer >= 1")
    return value


def _validate_seed(value: Any) -> str | None:
    if value is None:
        return None
    text = _render_value(value)
    parts = text.split(",")
    if not 1 <= len(parts) <= 4 or not all(re.fullmatch(r"-?\d+|None", p.strip()) for p in parts):
        raise GridError(f"seed: value {value!r} must be an integer or up to 4 comma-separated integers "
                        "(python, numpy, torch, fewshot), e.g. '0,1234,1234,1234'")
    return ",".join(p.strip() for p in parts)




class ConfigurationChecker:
    """Validates one configuration's model arguments and spells them canonically.

    The model wrapper's own keys (``wrapper_keys()``: pretrained, dtype, ...) are the wrapper's to
    check; everything else is the engine's: ``Recipe.parse`` raises ``RecipeError`` naming the
    key, the value and the choices. ``canonical_model_args`` is exactly what ``lmms-quant eval`` will
    pass to lmms-eval, and its hash keys the run directory.
    """

    def __init__(self, model: str, fixed_keys: Iterable[str] = ()):
        from lmms_quant.quant.recipe import Recipe

        self.recipe = Recipe
        self.wrapper = model_class(model)
        self.wrapper_keys = tuple(self.wrapper.wrapper_keys())

    def plan_keys(self, args: dict[str, Any]) -> set[str]:
        return {k for k in args if k not in self.wrapper_keys}

    def __call__(self, args: dict[str, Any]) -> tuple[str, Any]:
        plan_kwargs = {k: v for k, v in args.items() if k not in self.wrapper_keys}
        plan = self.recipe.parse(plan_kwargs, other_valid_keys=self.wrapper_keys)
        rendered = ",".join(f"{k}={_render_value(v)}" for k, v in args.items())
        return self.wrapper.canonical_model_args(rendered), plan


def expand(varied_axes: dict[str, list], include: list[dict], exclude: list[dict]) -> list[dict[str, Any]]:
    """The axis product, less what ``exclude`` matches, plus ``include`` (in file order, no repeats).

    Without axes the product is the fixed arguments alone, one configuration, unless ``include`` lists
    the configurations: then those are the grid."""
    keys = list(varied_axes)
    product = [dict(zip(keys, values)) for values in itertools.product(*(varied_axes[k] for k in keys))]
    if not keys and include:
        product = []
    kept = [c for c in product if not any(all(c.get(k) == v for k, v in rule.items()) for rule in exclude)]
    return kept + [dict(extra) for extra in include]


def load_grid(path: str | os.PathLike | None = None, *, data: dict | None = None,
              output_dir: str | os.PathLike | None = None,
              known_tasks: Callable[[], set[str]] = known_task_names,
              checker_factory: Callable[[str, Iterable[str]], Callable] = ConfigurationChecker) -> Grid:
    """Parse and validate a grid (a YAML file, or its already-parsed ``data``) into configurations.

    Raises GridError naming the first bad key or value; nothing is run or written.
    """
    where = str(path) if path is not None else "grid"
    if data is None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise GridError(f"{where}: cannot read the grid file: {err}") from None
        except yaml.YAMLError as err:
            raise GridError(f"{where}: not valid YAML: {err}") from None
    try:
        return _load_grid(path, _mapping("grid", data), output_dir, known_tasks, checker_factory)
    except GridError as err:
        raise GridError(f"{where}: {err}") from None


def _load_grid(path, data, output_dir, known_tasks, checker_factory) -> Grid:
    unknown = [k for k in data if k not in GRID_KEYS]
    if unknown:
        raise GridError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(GRID_KEYS)}")
    for required in ("model", "tasks"):
        if required not in data:
            raise GridError(f"missing required key {required!r} ({GRID_KEYS[required]})")
    model = data["model"]
    if model not in MODEL_CLASSES:
        raise GridError(f"model: unknown model {model!r}; valid choices: {', '.join(MODEL_CLASSES)}")

    fixed = dict(_mapping("model_args", data.get("model_args") or {}))
    for key, value in fixed.items():
        _check_scalar("model_args", key, value)
    axes = _mapping("axes", data.get("axes") or {})
    for key, values in axes.items():
        if key in fixed:
            raise GridError(f"axes.{key}: also fixed in model_args; give it in one place only")
        if not isinstance(values, list) or not values:
            raise GridError(f"axes.{key}: expected a non-empty list of values, got {values!r}")
        for value in values:
            _check_scalar("axes", key, value)
        seen = [_render_value(v) for v in values]
        duplicate = next((v for v in seen if seen.count(v) > 1), None)
        if duplicate is not None:
            raise GridError(f"axes.{key}: value {duplicate!r} is listed twice")
    include = _list_of_mappings("include", data.get("include") or [])
    for i, extra in enumerate(include):
        if not extra:
            raise GridError(f"include[{i}]: empty mapping")
        for key, value in extra.items():
            _check_scalar(f"include[{i}]", key, value)
            if key in fixed:
                raise GridError(f"include[{i}].{key}: also fixed in model_args; give it in one place only")
    exclude = _list_of_mappings("exclude", data.get("exclude") or [])
    for i, rule in enumerate(exclude):
        if not rule:
            raise GridError(f"exclude[{i}]: empty mapping")
        for key, value in rule.items():
            if key not in axes:
                raise GridError(f"exclude[{i}].{key}: not an axis; axes: {', '.join(axes) or '(none)'}")
            if _render_value(value) not in [_render_value(v) for v in axes[key]]:
                raise GridError(f"exclude[{i}].{key}: value {value!r} is not one of the axis values "
                                f"{axes[key]!r}")

    tasks = _validate_tasks(data["tasks"], known_tasks)
    limit = _validate_limit(data.get("limit"))
    batch_size = _positive_int("batch_size", data["batch_size"]) if data.get("batch_size") is not None else None
    seed = _validate_seed(data.get("seed"))
    processes = _positive_int("processes_per_config", data.get("processes_per_config", 1))
    # Paths in a grid file are relative to the file, so a sweep resumed from another working
    # directory finds the same data, checkpoints and run directories.
    here = Path(path).resolve().parent if path is not None else Path.cwd()
    data_root = data.get("data_root")
    if data_root is not None:
        if not isinstance(data_root, str) or not (here / Path(data_root).expanduser()).is_dir():
            raise GridError(f"data_root: {data_root!r} is not a directory")
        data_root = str((here / Path(data_root).expanduser()).resolve())
    pretrained = fixed.get("pretrained")
    if isinstance(pretrained, str) and pretrained.startswith(("./", "../", "~")):
        fixed["pretrained"] = str((here / Path(pretrained).expanduser()).resolve())
    if output_dir is not None:
        out = Path(output_dir)
    elif data.get("output_dir") is not None:
        if not isinstance(data["output_dir"], str):
            raise GridError(f"output_dir: value {data['output_dir']!r} must be a path")
        out = here / Path(data["output_dir"]).expanduser()
    else:
        out = here / "runs" / (Path(path).stem if path is not None else "grid")

    try:
        checker = checker_factory(model, fixed)
    except ImportError as err:
        raise GridError(f"cannot validate plans: the quantization engine is not importable ({err})") from None
    product_and_include = expand(axes, include, exclude)
    n_product = len(product_and_include) - len(include)
    members = []
    for i, varied in enumerate(product_and_include):
        origin = "axes" if i < n_product else f"include[{i - n_product}]"
        members.append((origin, {**fixed, **varied}, tuple(varied.items())))
    # One FP16 baseline per distinct setting of the wrapper's own keys (pretrained, dtype, prompts...):
    # every configuration is compared with the unquantized model it was quantized from.
    baselines = []
    for args in [args for _, args, _ in members] or [fixed]:
        wrapper_args = {k: v for k, v in args.items() if k not in checker.plan_keys(args)}
        differs = tuple((k, v) for k, v in wrapper_args.items() if k not in fixed or fixed[k] != v)
        baseline = ("baseline", {**wrapper_args, **BASELINE_ARGS}, differs)
        if baseline not in baselines:
            baselines.append(baseline)
    members = baselines + members

    configurations: dict[str, Configuration] = {}
    for origin, args, varied in members:
        try:
            canonical, plan = checker(args)
        except ValueError as err:  # PlanError, or the wrapper's own argument check
            shown = ", ".join(f"{k}={_render_value(v)}" for k, v in (varied or args.items()))
            raise GridError(f"{origin} configuration {{{shown}}}: {err}") from None
        config = Configuration(
            model=model, model_args=canonical, tasks=tasks, varied=varied,
            is_baseline=bool(getattr(plan, "is_noop", False)),
            plan_digest=plan.digest() if hasattr(plan, "digest") else None,
            limit=limit, batch_size=batch_size, seed=seed, data_root=data_root,
        )
        if origin == "baseline" and not config.is_baseline:
            raise GridError(f"the engine does not treat {BASELINE_ARGS} as the unquantized baseline")
        configurations.setdefault(config.run_id, config)  # the same configuration twice runs once
    return Grid(path=Path(path) if path is not None else None, configurations=tuple(configurations.values()),
                output_dir=Path(out), processes_per_config=processes)


# --------------------------------------------------------------------------- run directories


def find_results_files(eval_output: Path) -> list[Path]:
    """lmms-eval's aggregated results under an --output_path (never submissions/*_results.json)."""
    return sorted(p for p in Path(eval_output).glob("*/*_results.json")
                  if p.parent.name != "submissions" and re.match(r"^\d{8}_\d{6}_results\.json$", p.name))


def completed_run(run_dir: Path, run_id: str | None = None) -> dict | None:
    """The run record of a finished configuration, or None if the directory holds no finished result."""
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok":
        return None
    if run_id is not None and record.get("run_id") != run_id:
        return None
    results = record.get("results_file")
    if not results or not (Path(run_dir) / results).is_file():
        return None
    return record


WEIGHT_CACHE_DIR = "weight_cache"


def eval_arguments(config: Configuration, run_dir: Path) -> list[str]:
    """The `lmms-quant eval` arguments for one configuration (everything after the command itself)."""
    model_args = config.model_args
    if not config.is_baseline and "weight_cache" not in (part.split("=", 1)[0] for part in model_args.split(",")):
        # Quantized weights are kept under the sweep's output directory, so a configuration interrupted
        # after quantizing, or scored on other tasks later, does not quantize again. Not part of the
        # configuration (nor of its run id): where weights are cached does not change results.
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


# --------------------------------------------------------------------------- scheduling


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one configuration runs at a time: a group of GPUs, or the CPU (gpus == ())."""

    gpus: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else {}

    def launcher(self) -> list[str]:
        if len(self.gpus) <= 1:
            return []
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(len(self.gpus)), "-m", "lmms_quant.cli"]

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


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: get SIGKILLed when the sweep dies, so no orphan writes into a run dir."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the sweep died before prctl took effect
        os._exit(1)


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
                _die_with_parent(parent)
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


def _fmt_duration(seconds: float | None) -> str:
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


@dataclasses.dataclass
class _Running:
    index: int
    config: Configuration
    run_dir: Path
    process: subprocess.Popen | ForkedEval
    started: float
    started_wall: float
    log: Any
    command: list[str]


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

    def _lock(self):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.output_dir / "sweep.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise GridError(f"another sweep is running in {self.output_dir} (it holds sweep.lock)") from None
        return handle

    def run(self, configurations: Sequence[Configuration]) -> dict[str, str]:
        """Run what is not finished; return run id -> 'ok' | 'skipped' | 'failed'."""
        lock = self._lock()
        try:
            return self._run(list(configurations))
        finally:
            lock.close()

    def _run(self, configurations: list[Configuration]) -> dict[str, str]:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if self.fork and not all(completed_run(self.run_dir(c), c.run_id) for c in configurations):
            preload_eval()
        write_json_atomic(self.output_dir / "sweep.json", {
            "configurations": [{"run_id": c.run_id, "label": c.label, **c.identity()} for c in configurations],
        })
        progress = Progress(len(configurations), len(self.slots), self.stream)
        outcome: dict[str, str] = {}
        pending: deque[tuple[int, Configuration]] = deque()
        for config in configurations:
            index = progress.next_index()
            if completed_run(self.run_dir(config), config.run_id):
                outcome[config.run_id] = "skipped"
                progress.say(f"configuration {index} of {progress.total}: {config.label} "
                             f"[{config.run_id}] already complete, skipped")
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
                    status = self._finish(job)
                    outcome[job.config.run_id] = status
                    duration = time.monotonic() - job.started
                    if status == "ok":
                        progress.durations.append(duration)
                    eta = progress.eta(len(pending), [time.monotonic() - j.started for j in running.values()])
                    progress.say(
                        f"configuration {job.index} of {progress.total}: {job.config.label} "
                        f"{'done' if status == 'ok' else 'FAILED (see ' + str(job.run_dir / LOG_FILE) + ')'}"
                        f" in {_fmt_duration(duration)}; elapsed {_fmt_duration(progress.elapsed())}, "
                        f"ETA {_fmt_duration(eta) if (pending or running) else '0m00s'}")
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
        if run_dir.exists():  # an interrupted or failed attempt: nothing in it is trusted
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        command = self.command_for(config, slot)
        write_json_atomic(run_dir / CONFIG_FILE, {
            "run_id": config.run_id, "label": config.label, "is_baseline": config.is_baseline,
            "plan_digest": config.plan_digest, "varied": dict(config.varied), "identity": config.identity(),
            "command": command,
        })
        progress.say(f"configuration {index} of {progress.total}: {config.label} [{config.run_id}] "
                     f"starting on {slot}; elapsed {_fmt_duration(progress.elapsed())}")
        log = open(run_dir / LOG_FILE, "wb")
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        env = {**os.environ, **self.extra_env, **slot.env()}
        if self.fork and not slot.gpus:
            process = ForkedEval(command[len(self.eval_command):], log, env)
        else:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=functools.partial(_die_with_parent, os.getpid()),
                                       start_new_session=True)
        return _Running(index, config, run_dir, process, time.monotonic(), time.time(), log, command)

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

    def _finish(self, job: _Running) -> str:
        job.log.close()
        returncode = job.process.returncode
        results = find_results_files(job.run_dir / EVAL_OUTPUT)
        error = None
        if returncode != 0:
            error = f"lmms-quant eval exited with status {returncode}"
        elif len(results) != 1:
            error = f"expected one lmms-eval results file, found {len(results)}"
        record = {
            "status": "ok" if error is None else "failed",
            "error": error,
            "run_id": job.config.run_id,
            "label": job.config.label,
            "is_baseline": job.config.is_baseline,
            "plan_digest": job.config.plan_digest,
            "varied": dict(job.config.varied),
            "identity": job.config.identity(),
            "command": job.command,
            "returncode": returncode,
            "started": job.started_wall,
            "finished": time.time(),
            "duration_s": round(time.monotonic() - job.started, 3),
            "results_file": str(results[0].relative_to(job.run_dir)) if error is None else None,
        }
        # Renamed into place last: a finished configuration is exactly one whose run.json says ok.
        write_json_atomic(job.run_dir / RUN_FILE, record)
        return record["status"]


# --------------------------------------------------------------------------- command line


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmms-quant sweep",
        description="Run a grid of quantization configurations through lmms-eval; rerun to resume.")
    parser.add_argument("grid", help="grid YAML file (see `python -m pydoc lmms_quant.sweep`)")
    parser.add_argument("--output-dir", default=None, help="overrides the grid's output_dir")
    parser.add_argument("--gpus", default="auto",
                        help="'auto' (CUDA_VISIBLE_DEVICES / all visible), 'none', or ids like 0,1,2,3")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the configurations; run nothing")
    parser.add_argument("--eval-command", default=None,
                        help="command that evaluates one configuration (default: this Python's "
                             "`-m lmms_quant.cli eval`); the eval arguments are appended")
    parser.add_argument("--fork", choices=("auto", "on", "off"), default="auto",
                        help="evaluate each configuration in a fork of a process that imported lmms-eval once "
                             "(saves ~10 s a configuration); auto = on when running on the CPU only")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid, output_dir=args.output_dir)
        slots = make_slots(_parse_gpus(args.gpus), grid.processes_per_config)
    except GridError as err:
        print(f"lmms-quant sweep: {err}", file=sys.stderr)
        return 2
    eval_command = shlex.split(args.eval_command) if args.eval_command else None
    if eval_command and shutil.which(eval_command[0]) is None:
        print(f"lmms-quant sweep: --eval-command: {eval_command[0]!r} is not an executable", file=sys.stderr)
        return 2
    fork = args.fork == "on" or (args.fork == "auto" and not any(slot.gpus for slot in slots))
    runner = SweepRunner(grid.output_dir, slots=slots, eval_command=eval_command, fork=fork)
    n = len(grid.configurations)
    print(f"{n} configurations ({n - 1} + the fp16 baseline) on {len(slots)} slot(s): "
          f"{', '.join(map(str, slots))}; output {grid.output_dir}", flush=True)
    if args.dry_run:
        for i, config in enumerate(grid.configurations, 1):
            done = " (complete)" if completed_run(runner.run_dir(config), config.run_id) else ""
            print(f"  {i:>4}  {config.run_id}  {config.label}{done}")
        return 0
    try:
        outcome = runner.run(grid.configurations)
    except GridError as err:
        print(f"lmms-quant sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmms-quant sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    failed = [run_id for run_id, status in outcome.items() if status == "failed"]
    print(f"{len(outcome) - len(failed)} of {n} configurations complete"
          + (f"; {len(failed)} failed (rerun to retry): {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
