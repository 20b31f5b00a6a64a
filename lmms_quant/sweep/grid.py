"""The grid file: its schema, its expansion into configurations, and their validation before anything runs.

A grid file names one model, its fixed arguments, the tasks, and the axes to vary::

    model: quant_blip2
    model_args: {pretrained: Salesforce/blip2-opt-2.7b, dtype: float16}
    tasks: [coco2017_cap_val_local, vqav2_val_local]
    limit: null                  # optional: lmms-eval --limit (a count, or a fraction in (0, 1))
    batch_size: 8                # optional: lmms-eval --batch_size
    seed: "0,1234,1234,1234"     # optional: lmms-eval --seed
    data_root: /data/lmms        # optional: where the *_local tasks read their parquet files
    output_dir: runs/blip2       # optional: default runs/<grid file stem>
    processes_per_config: 1      # optional: >1 runs one configuration on several GPUs via accelerate
    axes:                        # the product of these lists
      method: [rtn, gptq]
      bits: [3, 4, 8]
    exclude:                     # optional: drop product members that match every key given
      - {method: rtn, bits: 3}
    include:                     # optional: explicit extra configurations (never excluded)
      - {method: awq, bits: 4}
    executor: {name: slurm, timeout_min: 240}   # optional: where they run (lmms_quant.sweep.executors)

Relative paths (data_root, output_dir, a pretrained starting with ./ ../ or ~) are relative to the
grid file.

The FP16 baseline (``method: fp16``) is always added. Every key and value is checked before anything
runs: the plan keys of every expanded configuration go through the engine's plan parser
(:func:`parse_plan`, the one place the sweep calls it) and the model wrapper's own argument check, so
a typo fails in a second, not after hours of finished configurations.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.metadata
import itertools
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from lmms_quant.model_ids import MODEL_CLASSES, model_class
from lmms_quant.sweep.executors import ExecutorSpec, parse_executor
from lmms_quant.sweep.rundir import run_id_of

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
    "executor": "mapping: where configurations run (name: local, slurm or submitit-local, and its resources)",
}
BASELINE_ARGS = {"method": "fp16"}
_ARG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class GridError(ValueError):
    """A grid file that cannot run; the message names the offending key and value."""


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
        return run_id_of(self.identity())

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
    executor: ExecutorSpec = ExecutorSpec()


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


def parse_plan(plan_kwargs: dict[str, Any]):
    """The engine's validated recipe of one configuration — the sweep's only call into its parser.

    Raises the engine's ``RecipeError`` (a ValueError naming the key, the value and the valid
    choices). The sweep reads only ``.is_noop`` and ``.digest()`` of the result.
    """
    from lmms_quant.quant.recipe import Recipe

    return Recipe.parse(plan_kwargs)


class ConfigurationChecker:
    """Validates one configuration's model arguments and spells them canonically.

    The wrapper's ``canonical_model_args`` checks everything (its own keys, which for ``quant``
    depend on the lmms-eval class it wraps, and the recipe, naming any bad key); it is exactly what
    ``lmms-quant eval`` will pass to lmms-eval, and its hash keys the run directory. The recipe keys
    are the engine's (:func:`parse_plan`).
    """

    def __init__(self, model: str):
        from lmms_quant.quant.recipe import recipe_keys

        self.wrapper = model_class(model)
        self.recipe_keys = frozenset(recipe_keys())

    def plan_keys(self, args: dict[str, Any]) -> set[str]:
        return {k for k in args if k in self.recipe_keys}

    def __call__(self, args: dict[str, Any]) -> tuple[str, Any]:
        rendered = ",".join(f"{k}={_render_value(v)}" for k, v in args.items())
        canonical = self.wrapper.canonical_model_args(rendered)
        plan = parse_plan({k: v for k, v in args.items() if k in self.recipe_keys})
        return canonical, plan


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
              known_tasks: Callable[[], set[str]] = known_task_names, executor: str | None = None) -> Grid:
    """Parse and validate a grid (a YAML file, or its already-parsed ``data``) into configurations.

    ``executor`` overrides the grid's ``executor.name`` (``--executor``). Raises GridError naming the
    first bad key or value; nothing is run or written.
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
        return _load_grid(path, _mapping("grid", data), output_dir, known_tasks, executor)
    except GridError as err:
        raise GridError(f"{where}: {err}") from None


def _load_grid(path, data, output_dir, known_tasks, executor_name) -> Grid:
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
        executor = parse_executor(data.get("executor"), processes_per_config=processes, name=executor_name)
    except ValueError as err:
        raise GridError(str(err)) from None
    try:
        checker = ConfigurationChecker(model)
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
        except ImportError as err:
            raise GridError(f"cannot validate plans: the quantization engine is not importable ({err})") from None
        except ValueError as err:  # RecipeError, or the wrapper's own argument check
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
                output_dir=Path(out), processes_per_config=processes, executor=executor)


