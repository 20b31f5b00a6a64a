"""Functions that tests/test_sweep_cluster.py submits as submitit jobs (imported by the job processes, so a
module of its own: the test module itself is not importable from a job)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path


def wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def build_or_read_cache_entry(root: str, key: str, meeting: str, me: str, other: str) -> tuple[bool, str]:
    """Ask the weight cache for ``key`` at the same time as the job ``other``; return (hit, digest of the tensors).

    Both jobs first meet (each waits for the other's marker), then announce that they are about to ask
    and ask. The builder — whichever takes the key's lock first — does not finish building before the
    other has announced, so the other asks while the entry is being built.
    """
    import torch

    from lmms_quant.weight_cache import WeightCache

    meeting_dir = Path(meeting)
    (meeting_dir / f"ready-{me}").touch()
    wait_for(meeting_dir / f"ready-{other}")

    def build():
        (meeting_dir / f"built-by-{me}").touch()
        wait_for(meeting_dir / f"asking-{other}")
        generator = torch.Generator().manual_seed(0)
        tensors = {f"layer{i}.weight": torch.randn(64, 64, generator=generator) for i in range(8)}
        return tensors, {"plan": {"method": "rtn"}, "built_by": me}

    (meeting_dir / f"asking-{me}").touch()
    entry, hit = WeightCache(root).get_or_build(key, build)
    digest = hashlib.sha256()
    for name in sorted(entry.tensors):
        digest.update(name.encode() + entry.tensors[name].numpy().tobytes())
    return hit, digest.hexdigest()
