"""Where lmms-eval finds lmms-quant's tasks, and on which data they run.

The shipped YAMLs (package ``lmms_quant.tasks``) are ordinary lmms-eval task files: they ``include``
the installed lmms-eval YAML by a path relative to themselves and read local parquet files from
``data/<task>/<split>.parquet`` beside them. Both relative paths only hold in one particular layout
(lmms-eval and lmms-quant in the same site-packages, data copied next to the YAMLs), so
:func:`render_tasks` writes a copy with absolute paths for a chosen data root, into a cache
directory, and that copy is what ``--include_path`` gets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import yaml

from lmms_quant.atomic import atomic_directory

LOCAL_DATA_PREFIX = "data/"
LMMS_EVAL_TASKS_PREFIX = "../../lmms_eval/tasks/"


class _FunctionRef(str):
    """A ``!function module.attr`` tag, kept verbatim so that rendering does not import anything."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
_TaskDumper.add_representer(_FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def shipped_tasks_dir() -> Path:
    return Path(importlib.util.find_spec("lmms_quant.tasks").submodule_search_locations[0])


def lmms_eval_tasks_dir() -> Path:
    return Path(importlib.util.find_spec("lmms_eval.tasks").submodule_search_locations[0])


def cache_dir() -> Path:
    root = os.environ.get("LMMS_QUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmms_quant"
    )
    return Path(root)


def default_data_root() -> Path:
    """Where ``*_local`` tasks read their parquet files unless told otherwise."""
    return Path(os.environ.get("LMMS_QUANT_DATA") or cache_dir() / "data")


def _render_one(config: dict, data_root: Path, lmms_eval_tasks: Path) -> dict:
    config = dict(config)
    include = config.get("include")
    if isinstance(include, str) and include.startswith(LMMS_EVAL_TASKS_PREFIX):
        target = lmms_eval_tasks / include[len(LMMS_EVAL_TASKS_PREFIX):]
        if not target.is_file():
            raise FileNotFoundError(f"task include {include!r}: {target} is not in the installed lmms-eval")
        config["include"] = str(target)
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("data_files"), dict):
        files = {}
        for split, path in kwargs["data_files"].items():
            if isinstance(path, str) and path.startswith(LOCAL_DATA_PREFIX):
                path = str(data_root / path[len(LOCAL_DATA_PREFIX):])
            files[split] = path
        config["dataset_kwargs"] = {**kwargs, "data_files": files}
    return config


def render_tasks(data_root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the shipped task YAMLs with absolute paths for ``data_root``; return the directory.

    The default ``out_dir`` is a cache entry keyed by everything the rendering depends on, written to a
    temporary directory and renamed into place, so a concurrent or interrupted render never leaves a
    half-written task directory behind.
    """
    data_root = Path(data_root or default_data_root()).resolve()
    shipped = shipped_tasks_dir()
    lmms_eval_tasks = lmms_eval_tasks_dir()
    sources = sorted(shipped.glob("*.yaml"))
    if out_dir is None:
        key = hashlib.sha256()
        for part in (str(data_root), str(lmms_eval_tasks)):
            key.update(part.encode() + b"\0")
        for src in sources:
            key.update(src.name.encode() + b"\0" + src.read_bytes())
        out_dir = cache_dir() / "tasks" / key.hexdigest()[:16]
        if out_dir.is_dir():
            return out_dir
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, replace=True) as staging:
        for src in sources:
            config = yaml.load(src.read_text(), Loader=_TaskLoader)
            rendered = _render_one(config, data_root, lmms_eval_tasks)
            (staging / src.name).write_text(
                f"# rendered by lmms-quant from {src} for data root {data_root}\n"
                + yaml.dump(rendered, Dumper=_TaskDumper, sort_keys=False)
            )
    return out_dir


def local_task_data_files(rendered_dir: Path) -> dict[str, list[Path]]:
    """Task name → the local parquet files it reads (to tell a user which data is missing)."""
    needed = {}
    for path in sorted(Path(rendered_dir).glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=_TaskLoader)
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if config.get("dataset_path") == "parquet" and isinstance(files, dict):
            needed[config["task"]] = [Path(p) for p in files.values()]
    return needed
