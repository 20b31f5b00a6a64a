"""lmms-eval requests as the wrappers see them: the doc and chat messages of a request, the datasets a
run scores, and the translation of a task's generation settings to transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from loguru import logger as eval_logger
from lmms_eval.protocol import ChatMessages
from transformers import GenerationConfig

from lmms_quant.values import parse_bool

# Used when a task sets neither max_new_tokens nor max_length (transformers' own default,
# max_length=20, counts the prompt and would leave LLaVA's 576 image tokens no room).
DEFAULT_MAX_NEW_TOKENS = 128

# Sampling knobs: meaningless (and warned about by transformers) under greedy/beam decoding.
SAMPLING_ONLY_KEYS = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


def tasks_of_requests(requests) -> dict[str, Any]:
    """Task name -> lmms-eval task object, found through the bound methods each request carries.

    lmms-eval gives the model only ``task_dict[task] = task.dataset``; the task object itself (with
    its dataset_path / dataset_name) is reachable as ``__self__`` of the doc_to_messages /
    doc_to_visual callables in the request arguments.
    """
    tasks = {}
    for request in requests:
        for arg in request.args:
            task = getattr(arg, "__self__", None)
            config = getattr(task, "config", None)
            if callable(arg) and config is not None and hasattr(config, "dataset_path"):
                tasks[request.args[-2]] = task
                break
    return tasks


def _data_files(config, split: str) -> list[str]:
    files = (getattr(config, "dataset_kwargs", None) or {}).get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if files is None:
        return []
    return [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]


def evaluated_datasets(requests, task_dict: dict) -> list[tuple[str, str | None, str]]:
    """(dataset_path, dataset_name, split) of every task lmms-eval is scoring, as the engine wants them.

    The split is the one the requests ask for (the task's eval split). A task that reads local files
    through a packaged builder (``dataset_path: parquet`` + ``dataset_kwargs.data_files``) is listed
    twice: once as configured, once per data file of that split in place of the path. A task that is in
    ``task_dict`` but has no request here (another request type) has no reachable dataset path: it is
    logged and left out.
    """
    tasks = tasks_of_requests(requests)
    splits: dict[str, set] = {}
    for request in requests:
        task_name, split = request.args[-2], request.args[-1]
        splits.setdefault(task_name, set()).add(split)
    found = []
    for task_name, task in tasks.items():
        for split in sorted(splits.get(task_name, ())):
            found.append((str(task.config.dataset_path), task.config.dataset_name, split))
            # A packaged builder ("parquet", "json", ...) is no identity; its data files are.
            for path in _data_files(task.config, split):
                found.append((path, task.config.dataset_name, split))
    unreachable = sorted(set(task_dict) - set(tasks))
    if unreachable:
        eval_logger.warning(f"lmms-quant: no dataset path reachable for tasks {unreachable}; a calibration "
                            f"set equal to their data would not be detected")
    return sorted(set(found), key=str)


@dataclass
class ChatRequest:
    """One chat generate_until request, with its doc looked up: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``."""

    ctx: str
    gen_kwargs: dict
    doc_id: int
    task: str
    split: str
    doc: dict
    messages: ChatMessages

    @property
    def images(self) -> list:
        images, videos, audios = self.messages.extract_media()
        if videos or audios:
            raise NotImplementedError(f"{self.task}/{self.split} doc {self.doc_id}: video and audio inputs are not supported")
        return images

    @property
    def text(self) -> str:
        """The text of the (last) user turn, i.e. the task's prompt for this doc."""
        user_turns = [m for m in self.messages.messages if m.role == "user"]
        if not user_turns:
            raise ValueError(f"{self.task}/{self.split} doc {self.doc_id}: the chat messages have no user turn")
        return "".join(c.text for c in user_turns[-1].content if c.type == "text")

    @property
    def where(self) -> str:
        return f"{self.task}/{self.split} doc {self.doc_id}"


def hf_generate_kwargs(gen_kwargs: dict, pad_token_id: int | None) -> tuple[dict, list[str]]:
    """lmms-eval gen_kwargs -> (kwargs for transformers' generate, the `until` stop strings).

    `until` is lmms-eval's (always present) and truncates decoded text; keys transformers'
    GenerationConfig does not know are dropped with a warning. Decoding is greedy unless the task asks
    for sampling (do_sample, or a temperature > 0 as lmms-eval's own wrappers read it).
    """
    kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
        raise ValueError(f"until: got {until!r}; valid: a string or a list of strings")
    known = GenerationConfig().to_dict()
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        eval_logger.warning(f"lmms-quant: ignoring generation settings transformers does not know: {unknown}")
        for key in unknown:
            kwargs.pop(key)
    temperature = kwargs.get("temperature", 0)
    do_sample = parse_bool("do_sample", kwargs["do_sample"]) if "do_sample" in kwargs else float(temperature) > 0
    kwargs["do_sample"] = do_sample
    if not do_sample:
        for key in SAMPLING_ONLY_KEYS:
            kwargs.pop(key, None)
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
        kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if pad_token_id is not None:
        kwargs.setdefault("pad_token_id", pad_token_id)
    return kwargs, [s for s in until if s]


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """Cut at the earliest stop string (lmms-eval's `until`), then strip surrounding whitespace."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut].strip()


def eos_token_ids(generation_config) -> set[int]:
    """The ids that end a generation (``eos_token_id`` is an int, a list or None)."""
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def count_generated(ids: torch.Tensor, eos_token_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest of a finished row is padding)."""
    for i, token in enumerate(ids.tolist()):
        if token in eos_token_ids:
            return i + 1
    return len(ids)
