"""Writes that readers see whole or not at all: a temp file in the target's directory, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, data: dict, *, sort_keys: bool = True) -> None:
    """Write JSON so that readers see either nothing or the whole file, even across a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=sort_keys)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_dir_atomic(path, write, *, may_replace=None) -> Path:
    """Build a directory with ``write(tmp_dir)`` in a sibling temp dir, then rename it to ``path``.

    An existing ``path`` is replaced only when ``may_replace(path)`` is true (e.g. it holds an older
    fixture), so an unrelated directory is never swapped out; readers see the old or the new whole."""
    import shutil

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (may_replace is not None and may_replace(path)):
        raise FileExistsError(f"out_dir: {str(path)!r} exists and holds something else; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path
