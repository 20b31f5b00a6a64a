"""lmms-eval's task index, built once in a process that forks evaluations, instead of once per fork.

``lmms-eval``'s CLI builds a ``TaskManager`` for every evaluation, and the manager indexes every task
YAML of lmms-eval (300+ directories) and of the include path: seconds per configuration on a small
CPU, more than a tiny model's evaluation. The index depends only on the YAML files under those
directories, which do not change during a sweep. `share_task_index` builds it in the parent, before
configurations are forked, and makes lmms-eval's CLI (``lmms_eval.__main__.TaskManager``, the name
``cli_evaluate_single`` calls) a subclass that starts from a copy of that index when it is asked for
the same directories. Everything else the manager does (loading the tasks, their datasets, the
model-specific configuration) is lmms-eval's own, in the child, as before.
"""

from __future__ import annotations

import copy
import os
from typing import Iterable


def _key(include_path, include_defaults: bool) -> tuple:
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    return bool(include_defaults), tuple(os.path.abspath(os.fspath(p)) for p in paths)


def _indexing_task_manager():
    from lmms_eval.tasks import TaskManager

    class SharedIndexTaskManager(TaskManager):
        """lmms-eval's TaskManager, with the task index of directories indexed before reused."""

        indexes: dict[tuple, dict] = {}

        def initialize_tasks(self, include_path=None, include_defaults: bool = True):
            key = _key(include_path, include_defaults)
            if key not in self.indexes:
                self.indexes[key] = super().initialize_tasks(include_path=include_path,
                                                             include_defaults=include_defaults)
            # A copy: one evaluation's changes to its index never reach the next one in this process.
            return copy.deepcopy(self.indexes[key])

    return SharedIndexTaskManager


def share_task_index(include_paths: Iterable[str | os.PathLike]) -> None:
    """Index lmms-eval's tasks plus ``include_paths`` now; later evaluations in this process and its
    forks that include exactly these directories start from this index."""
    import lmms_eval.__main__ as lmms_eval_cli

    if not hasattr(lmms_eval_cli.TaskManager, "indexes"):
        lmms_eval_cli.TaskManager = _indexing_task_manager()
    lmms_eval_cli.TaskManager(include_path=[os.fspath(p) for p in include_paths])
