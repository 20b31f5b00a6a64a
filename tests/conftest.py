"""Shared, session-scoped test fixtures: tiny checkpoints and lmms-eval-schema datasets, built once."""

import os

import pytest

# Everything runs hub-free; a test that tries to download must fail, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Checkpoints(dict):
    """Builds each tiny checkpoint on first use, once per test session."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, kind):
        from lmms_quant.fixtures.models import FIXTURE_BUILDERS

        self[kind] = FIXTURE_BUILDERS[kind](self.root / kind, seed=0)
        return self[kind]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Model kind ("blip2_opt", "blip2_t5", "blip2_itm", "llava") → a from_pretrained-loadable dir."""
    return _Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root holding every *_local task's parquet files (synthetic, deterministic)."""
    from lmms_quant.fixtures.datasets import write_lmms_eval_datasets

    root = tmp_path_factory.mktemp("data")
    write_lmms_eval_datasets(root, n_images=6, seed=0)
    try:
        from lmms_quant.fixtures.retrieval_data import write_retrieval_datasets
    except ImportError:
        pass
    else:
        write_retrieval_datasets(root, n_images=6, seed=0)
    return root


@pytest.fixture(scope="session")
def include_path(data_root, tmp_path_factory):
    """lmms-quant's task YAMLs rendered for ``data_root`` (what `lmms-quant tasks-path` prints)."""
    from lmms_quant.tasks_path import render_tasks

    return render_tasks(data_root, tmp_path_factory.mktemp("tasks") / "rendered")
