"""What every lmms-quant model wrapper shares: arguments, loading, the quantization seam, batching.

A wrapper is an lmms-eval chat model (``is_simple = False``) that only loads, batches, generates and
decodes. Its life:

1. ``__init__``: the wrapper's own keys are parsed (`loading`); every other ``model_args`` key goes to
   `Recipe.parse` *before* anything is loaded, so a misspelt key fails in a second, naming the key.
   Then processor and model load through `loading.load_pretrained` (hub id or local dir).
2. The first request: lmms-eval has filled ``self.task_dict`` and the requests carry their task
   objects, so we know which datasets are being scored. Only now does `lmms_quant.quantize` run (it
   refuses a calibration set that is one of them, and owns the weight cache); its report is written
   beside lmms-eval's results (`quantize_for_requests`, the seam every wrapper uses).
3. Requests are grouped by generation settings (lmms-eval's ``Collator``) and served in batches that
   may mix tasks and splits; each request's doc is looked up on its own.

Subclasses name a transformers class and implement one batch (``generate_batch``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from loguru import logger as eval_logger
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import Collator
from tqdm import tqdm

import lmms_quant
from lmms_quant.atomic import write_json_atomic
from lmms_quant.values import format_value, parse_model_args

from .loading import (BASE_WRAPPER_KEYS, WrapperArgs, cli_output_path, load_pretrained, model_name_sanitized,
                      parse_wrapper_args, split_model_args)
from .requests import ChatRequest, count_generated, eos_token_ids, evaluated_datasets, hf_generate_kwargs, truncate_at


def report_path(report_dir: str | None, pretrained: str, digest: str) -> Path | None:
    """<output_path>/<model_name_sanitized>/quant_report_<recipe digest>.json, beside lmms-eval's results.

    output_path is ``report_dir``, else the running lmms-eval command's --output_path; None when
    neither exists (Python API without report_dir): the report then stays in memory.
    """
    root = report_dir or cli_output_path()
    if root is None:
        return None
    return Path(root) / model_name_sanitized(pretrained) / f"quant_report_{digest}.json"


def quantize_for_requests(model, processor, recipe, args: WrapperArgs, requests, task_dict, device=None) -> dict:
    """The quantization seam of every wrapper: quantize once, knowing which datasets are scored, and
    write the report where lmms-eval writes its results. Returns the report as a dict."""
    evaluated = evaluated_datasets(requests, task_dict)
    eval_logger.info(f"lmms-quant: quantizing {args.pretrained} ({recipe.digest()}); evaluated datasets {evaluated}")
    report = lmms_quant.quantize(model, processor, recipe, evaluated=evaluated, cache=args.weight_cache,
                                 device=device)
    if report.weight_cache is not None:
        eval_logger.info(f"lmms-quant: weight cache {'hit' if report.weight_cache['hit'] else 'miss'} "
                         f"({report.weight_cache['key']})")
    report = report.to_dict()
    path = report_path(args.report_dir, args.pretrained, recipe.digest())
    if path is None:
        eval_logger.warning("lmms-quant: no --output_path and no report_dir: the quantization report is not written")
    else:
        write_json_atomic(path, report)
        eval_logger.info(f"lmms-quant: quantization report written to {path}")
    return report


class QuantVLM(lmms):
    """Base lmms-eval chat model for lmms-quant's wrappers; see the module docstring.

    Subclasses set ``model_class`` (a transformers class with ``from_pretrained``), ``model_keys``
    (their own extra model_args, validated by ``parse_model_keys`` into ``self.options``) and
    implement ``generate_batch``.
    """

    is_simple = False
    model_class: type | None = None
    model_keys: tuple[str, ...] = ()

    @classmethod
    def wrapper_keys(cls) -> tuple[str, ...]:
        return BASE_WRAPPER_KEYS + tuple(cls.model_keys)

    # ------------------------------------------------------------------ arguments and the recipe

    @classmethod
    def parse_model_keys(cls, own: dict) -> dict:
        """Validate the subclass' own ``model_keys`` values; the result is ``self.options``."""
        return {}

    @classmethod
    def check_recipe(cls, recipe, kwargs: dict) -> None:
        """Refuse a recipe this model family cannot carry out (before loading); the base accepts all."""

    @classmethod
    def validate_model_args(cls, kwargs: dict):
        """(WrapperArgs, options, Recipe) for parsed model_args, or a ValueError naming the bad key."""
        from lmms_quant.quant.recipe import Recipe

        own, rest = split_model_args(kwargs, cls.wrapper_keys())
        recipe = Recipe.parse(rest, other_valid_keys=cls.wrapper_keys())
        cls.check_recipe(recipe, kwargs)
        options = cls.parse_model_keys(own)
        args = parse_wrapper_args(own)
        return args, options, recipe

    @classmethod
    def canonical_model_args(cls, model_args: str) -> str:
        """Validate a --model_args string and spell out the resolved recipe and the lmms-quant version.

        lmms-eval knows a configuration only by this string (response cache, results files), so the
        recipe's defaults must be written out. ``pretrained`` stays first: lmms-eval names the results
        directory after it.
        """
        kwargs = parse_model_args(model_args or "")
        if "batch_size" in kwargs:
            raise ValueError(f"batch_size: got {kwargs['batch_size']!r} inside --model_args; valid: pass it as "
                             f"lmms-eval's --batch_size (lmms-eval always passes its own)")
        _, _, recipe = cls.validate_model_args(kwargs)
        own, _ = split_model_args(kwargs, cls.wrapper_keys())
        own["lmms_quant_version"] = lmms_quant.__version__
        ordered = {"pretrained": own.pop("pretrained"), **own, **recipe.to_model_args()}
        canonical = ",".join(f"{k}={format_value(v)}" for k, v in ordered.items())
        reparsed = parse_model_args(canonical)
        if list(reparsed) != list(ordered):
            raise ValueError(f"model_args: cannot spell {ordered!r} as one lmms-eval model_args string "
                             f"(a value holds a comma or '='); got keys {list(reparsed)}")
        return canonical

    # ------------------------------------------------------------------ construction

    def __init__(self, **model_args) -> None:
        super().__init__()
        # Fails on a misspelt or invalid key before anything is loaded.
        self.args, self.options, self.recipe = self.validate_model_args(model_args)
        self.batch_size = self.args.batch_size
        self.processor, self.model = load_pretrained(self.model_class, self.args)
        self._device = self.model.device if self.args.device_map is not None else self.args.device
        self.quant_report = None
        self._quantization_pending = not self.recipe.is_noop

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------ the quantization seam

    def report_path(self) -> Path | None:
        return report_path(self.args.report_dir, self.args.pretrained, self.recipe.digest())

    def ensure_quantized(self, requests) -> None:
        """Quantize once, before the first request is served, knowing which datasets are scored."""
        if not self._quantization_pending:
            return
        self.quant_report = quantize_for_requests(self.model, self.processor, self.recipe, self.args, requests,
                                                  self.task_dict, device=self.device)
        self._quantization_pending = False

    # ------------------------------------------------------------------ requests

    def chat_request(self, args: tuple) -> ChatRequest:
        """A chat generate_until request with its doc (from task_dict) and messages built."""
        ctx, doc_to_messages, gen_kwargs, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        return ChatRequest(ctx=ctx, gen_kwargs=gen_kwargs, doc_id=doc_id, task=task, split=split, doc=doc,
                           messages=ChatMessages(messages=doc_to_messages(doc)))

    def run_batched(self, requests, serve: Callable[[list[tuple]], list], group_fn: Callable[[tuple], Any],
                    sort_fn: Callable[[tuple], Any] = lambda args: -len(args[0]), desc: str = "lmms-quant") -> list:
        """Serve requests in batches of ``self.batch_size`` that share ``group_fn(args)``; results in request order.

        A batch may mix tasks and splits. ``serve(list of args) -> list of results`` handles one batch.
        """
        collator = Collator([r.args for r in requests], sort_fn, group_fn=group_fn, grouping=True)
        results = []
        with tqdm(total=math.ceil(len(requests) / self.batch_size), disable=self.rank != 0, desc=desc) as bar:
            for batch in collator.get_batched(n=self.batch_size):
                batch = list(batch)
                out = serve(batch)
                if len(out) != len(batch):
                    raise RuntimeError(f"{type(self).__name__}: {len(out)} results for a batch of {len(batch)}")
                results.extend(out)
                bar.update(1)
        return collator.get_original(results)

    def generate_until(self, requests) -> list[GenerationResult]:
        self.ensure_quantized(requests)
        # The shared path: the fast one where it applies, else _serve_generation in run_batched's batches.
        from .generation import generation_path

        return generation_path(self).generate_until(requests)

    def _serve_generation(self, batch: list[tuple]) -> list[GenerationResult]:
        chat = [self.chat_request(args) for args in batch]
        gen_kwargs, stops = hf_generate_kwargs(chat[0].gen_kwargs, self.tokenizer.pad_token_id)
        try:
            texts, input_counts, output_counts = self.generate_batch(chat, gen_kwargs)
        except Exception as err:
            # Never an empty string counted as an answer: a broken (quantized) model must stop the run.
            where = ", ".join(r.where for r in chat)
            raise RuntimeError(f"{type(self).__name__}: generation failed for {where}: {err}") from err
        return [GenerationResult(text=truncate_at(t, stops), token_counts=TokenCounts(input_tokens=i, output_tokens=o))
                for t, i, o in zip(texts, input_counts, output_counts)]

    def generate_batch(self, requests: list[ChatRequest], gen_kwargs: dict) -> tuple[list[str], list[int], list[int]]:
        """Generate for one batch: (decoded new text per request, prompt tokens, generated tokens)."""
        raise NotImplementedError

    def decode_new_tokens(self, inputs, output_ids: torch.Tensor, encoder_decoder: bool):
        """Decode only what was generated: the prompt is not part of the answer."""
        if encoder_decoder:
            new = output_ids[:, 1:]  # drop the decoder start token
        else:
            new = output_ids[:, inputs["input_ids"].shape[1]:]
        eos_ids = eos_token_ids(self.model.generation_config)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        input_counts = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        output_counts = [count_generated(row, eos_ids) for row in new]
        return texts, input_counts, output_counts

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{type(self).__name__} serves generate_until tasks only; loglikelihood "
                                  f"(multiple-choice) tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} serves single-turn generate_until tasks only; "
                                  f"multi-round generation is not supported")
