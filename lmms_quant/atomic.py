"""Writes that readers see whole or not at all: build beside the target, then rename into place.

This is the project's one write-then-rename site: every result, report, cache entry, dataset and
checkpoint the project writes goes through `rename_into_place` (directly or through the helpers
below), so a process killed at any point leaves either the old state or the new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_into_place(src, dst) -> None:
    """Atomically rename ``src`` to ``dst`` (same filesystem) and make the rename durable.

    A file replaces an existing file; a directory may only replace a missing or empty one."""
    os.replace(src, dst)
    fsync_dir(Path(dst).absolute().parent)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``save_file``, ``to_parquet``);
    renamed to ``path`` when the block succeeds, deleted otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        rename_into_place(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", **open_kwargs) -> Iterator:
    """``with atomic_file(p) as handle: handle.write(...)``: ``p`` appears whole when the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(path, *, replace: bool = False) -> Iterator[Path]:
    """A staging directory beside ``path``, renamed to ``path`` when the block succeeds.

    ``replace``: an existing ``path`` is moved aside and deleted once the new one is in place (a reader
    sees the old directory or the new one); otherwise an existing non-empty ``path`` is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        old = None
        if path.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            rename_into_place(path, old / path.name)
        elif path.exists() and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        rename_into_place(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path, data: dict, *, sort_keys: bool = True) -> None:
    """Write JSON so that readers see either nothing or the whole file, even across a crash."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=sort_keys)
        handle.write("\n")


__all__ = ["atomic_directory", "atomic_file", "atomic_path", "fsync_dir", "rename_into_place",
           "write_json_atomic", "write_text_atomic"]
