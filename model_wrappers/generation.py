"""The one generate_until path every lmms-quant wrapper serves requests through.

lmms-eval hands a wrapper all generate_until requests of all tasks at once. They are grouped by
generation settings; each group is served by

- the **fast path** (`fast_generate`, on by default on CUDA) where the model family is supported
  (`vlm_parts`), the request has one image and the settings are plain greedy search
  (`decoding.greedy_settings`): requests are grouped by image *content*; each distinct image goes
  through the vision tower and connector once (`vision_cache`, optionally on disk across
  configurations: `feature_cache=DIR`); the prompt prefix all rows of a batch share (image tokens
  and template) is prefilled once per image and its KV cache copied to every question about that
  image; decoding runs on a static cache with a graph-captured step (`decoding`). Rows are ordered
  image by image, longest prompts first, so a batch pads little and an image's questions sit together;
- the **stock path** otherwise: the wrapper's own ``generate_batch`` (transformers' ``generate``),
  batched exactly as before.

``batch_size=auto`` (lmms-eval's ``--batch_size auto``) sizes the batches of both paths (`batch_size`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from tqdm import tqdm

from .batch_size import BatchSizes
from .decoding import Greedy, PhaseClock, Prompts, StaticCacheDecoder, greedy_settings
from .prepare import Preparer
from .prompt_ids import PromptIds
from .requests import ChatRequest, count_generated, eos_token_ids, hf_generate_kwargs, truncate_at
from .vision_cache import DiskFeatures, FeatureMemory, VisionFeatures, feature_namespace
from .vlm_parts import parts_for

log = logging.getLogger(__name__)

# Requests are prepared (docs fetched, images decoded, hashed and transformed) a chunk ahead, in threads:
# a first chunk of 2 batches (the GPU starts early), then chunks of 8 batches (at least CHUNK_MIN requests).
FIRST_CHUNK_BATCHES, CHUNK_BATCHES, CHUNK_MIN = 2, 8, 256
FEATURE_MEMORY_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}
SWITCH_INTERVAL_S = 0.0005


def vision_recipe(recipe) -> dict:
    """The part of a recipe the image features depend on (the one place that reads the recipe here)."""
    if recipe.is_noop:
        return {"vit_bits": 16, "connector_bits": 16}
    return {"vit_bits": recipe.selection.bits_for("vit"), "connector_bits": recipe.selection.bits_for("connector")}


def vision_in_fp(recipe) -> bool:
    """The vision tower and connector stay in floating point: their features are every such configuration's."""
    return all(bits == 16 for bits in vision_recipe(recipe).values())


@dataclass
class Row:
    """One request ready for the fast path."""

    index: int
    request: ChatRequest
    prompt: str
    image: object
    image_key: str  # content hash: what the feature caches are keyed by
    group: str  # rows of one group share one vision pass and one prefix (the image key, unless share_images is off)
    ids: list[int]


def order_rows(rows: list[Row]) -> list[Row]:
    """Image by image (each image's questions together), images with the longest prompts first."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: -len(r.ids))
    return [r for group in sorted(groups.values(), key=lambda g: -len(g[0].ids)) for r in group]


def common_prefix_len(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


class GenerationPath:
    """Serves one wrapper's generate_until requests (see the module docstring)."""

    def __init__(self, wrapper, fast: bool | None = None):
        """``fast``: force the fast path on or off (benchmarks); by default the wrapper's fast_generate."""
        self.wrapper = wrapper
        args = wrapper.args
        device = torch.device(wrapper.device)
        enabled = fast if fast is not None else args.fast_generate
        enabled = enabled if enabled is not None else device.type == "cuda"
        self.parts, why = (None, "fast_generate=false") if not enabled else parts_for(wrapper.model)
        if self.parts is not None and not all(hasattr(wrapper, h) for h in ("prompt_and_images", "processor_inputs")):
            self.parts, why = None, f"{type(wrapper).__name__} has no prompt_and_images / processor_inputs"
        self.why_stock = why
        if self.parts is None and args.feature_cache:
            log.info("lmms-quant: feature_cache=%s unused: it serves the fast path, and here %s",
                     args.feature_cache, why)
        self.device = device
        # Ablation switches (tests and benchmarks): each fast-path idea can be turned off on its own.
        self.share_images = True  # one vision pass per distinct image (off: one per request)
        self.share_prefix = True  # the shared prompt prefix prefilled once per image (off: whole prompts)
        self.sizing = BatchSizes(args.auto_batch, wrapper.batch_size, args.max_batch_size, self._release)
        wrapper.batch_sizes = self.sizing.sizes  # lmms-eval records lm.batch_sizes in its results
        self._vision: VisionFeatures | None = None
        self._decoder: StaticCacheDecoder | None = None
        self._prompt_ids = PromptIds(wrapper.processor, getattr(wrapper, "processor_inputs", None))
        self._preparer = Preparer(wrapper)
        self._prefetch: bool | None = None  # pixel transforms in the preparing threads (see check_pixels)
        self.clock = PhaseClock(device)  # seconds per phase, GPU phases by CUDA events
        self.stats = {"fast_requests": 0, "stock_requests": 0, "stock_reasons": {}, "batches": 0,
                      "distinct_images": 0, "prefix_tokens": 0, "suffix_tokens": 0, "prompt_tokens": 0}

    # ------------------------------------------------------------------ entry point

    def generate_until(self, requests) -> list:
        wrapper = self.wrapper
        if self.parts is None and not wrapper.args.auto_batch:
            self._count_stock(len(requests), self.why_stock)
            return wrapper.run_batched(requests, wrapper._serve_generation, group_fn=lambda a: a[2],
                                       desc="Model Responding")
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[2], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            greedy, stops = self._greedy(requests[indices[0]])
            if isinstance(greedy, str):
                self._count_stock(len(indices), greedy)
                stock = indices
            else:
                stock = self._serve_fast_streamed(requests, indices, greedy, stops, results)
            if stock:
                for i, result in zip(stock, self._serve_stock([requests[i] for i in stock])):
                    results[i] = result
        if self._vision is not None:
            self._vision.flush()
        return results

    def _count_stock(self, n: int, why: str) -> None:
        self.stats["stock_requests"] += n
        reasons = self.stats["stock_reasons"]
        if why not in reasons:
            log.info("lmms-quant: stock generation for %s", why)
        reasons[why] = reasons.get(why, 0) + n

    def _greedy(self, instance) -> tuple[Greedy | str, list[str]]:
        """The plain-greedy settings of a request's generation kwargs (or why the stock path serves it)."""
        if self.parts is None:
            return self.why_stock, []
        kwargs, stops = hf_generate_kwargs(instance.args[2], self.wrapper.tokenizer.pad_token_id)
        return greedy_settings(self.parts.generation_config, kwargs), stops

    def _rows(self, prepared: list[tuple]) -> tuple[list[Row], list[int]]:
        """Rows for the fast path (prompt ids on this thread) and the indices of requests it cannot take."""
        started = time.perf_counter()
        single = [p for p in prepared if p[4] is not None]
        ids = self._prompt_ids.many([p[2] for p in single], [p[3][0] for p in single])
        rows = [Row(i, request, prompt, images[0], key, key if self.share_images else f"request:{i}", row_ids)
                for (i, request, prompt, images, key), row_ids in zip(single, ids)]
        stock = [p[0] for p in prepared if p[4] is None]
        if stock:
            self._count_stock(len(stock), "requests without exactly one image")
        self.clock.add("prompt_ids", time.perf_counter() - started)
        return rows, stock

    def _split(self, requests, indices):
        """((fast rows, greedy, stop strings) or None, indices for the stock path), all at once."""
        greedy, stops = self._greedy(requests[indices[0]])
        if isinstance(greedy, str):
            self._count_stock(len(indices), greedy)
            return None, indices
        rows, stock = self._rows(self._preparer.docs(requests, indices))
        return ((rows, greedy, stops) if rows else None), stock

    def _serve_fast_streamed(self, requests, indices, greedy: Greedy, stops: list[str], results: list) -> list[int]:
        """Serve ``indices`` chunk by chunk, the next chunk prepared on CPU threads while the GPU serves this
        one (`prepare`). Rows are grouped by image and sorted within a chunk; an image whose questions
        straddle two chunks still goes through the tower once (its features stay in memory). Returns the
        indices left for the stock path."""
        self._setup()
        previous = sys.getswitchinterval()
        # The main thread waits for the interpreter lock each time a preparing thread holds it (up to the
        # switch interval, 5 ms by default, per hand-over); it launches every GPU kernel, so shorter waits.
        sys.setswitchinterval(min(previous, SWITCH_INTERVAL_S))
        try:
            return self._serve_chunks(requests, indices, greedy, stops, results)
        finally:
            sys.setswitchinterval(previous)

    def _serve_chunks(self, requests, indices, greedy: Greedy, stops: list[str], results: list) -> list[int]:
        size = self.sizing.largest
        first, rest = FIRST_CHUNK_BATCHES * size, max(CHUNK_MIN, CHUNK_BATCHES * size)
        chunks = [indices[:first]] + [indices[i:i + rest] for i in range(first, len(indices), rest)]
        leftover = []
        bar = tqdm(total=len(indices), disable=self.wrapper.rank != 0, desc="Model Responding (fast)")
        pending = self._preparer.submit(requests, chunks[0], self._ahead_vision())
        for k in range(len(chunks)):
            started = time.perf_counter()
            chunk = pending.result()
            if self._prefetch is None:
                one = next((item for item in chunk.items if item[4] is not None), None)
                if one is not None:  # may pixel transforms leave this thread? (the first chunk's ran here)
                    self._prefetch = self._vision.check_pixels(one[3][0], one[2])
            if k + 1 < len(chunks):
                pending = self._preparer.submit(requests, chunks[k + 1], self._ahead_vision())
            self.clock.add("waiting_for_cpu", time.perf_counter() - started)
            rows, stock = self._rows(chunk.items)
            leftover += stock
            if rows:
                self._serve_fast(rows, greedy, stops, results, chunk.ready, bar)
        bar.close()
        return leftover

    def _ahead_vision(self):
        """The vision cache for the preparing threads, once pixels may be made there (image sharing on)."""
        return self._vision if self._prefetch and self.share_images else None

    # ------------------------------------------------------------------ stock path

    def _serve_stock(self, instances) -> list:
        wrapper = self.wrapper
        if not wrapper.args.auto_batch:
            return wrapper.run_batched(instances, wrapper._serve_generation, group_fn=lambda a: a[2],
                                       desc="Model Responding")
        order = sorted(range(len(instances)), key=lambda i: -len(instances[i].args[0]))
        shape = f"stock:{json.dumps(instances[0].args[2], sort_keys=True, default=str)}"
        out = self.sizing.serve([instances[i].args for i in order], shape,
                                lambda batch, size: wrapper._serve_generation(batch))
        results = [None] * len(instances)
        for i, result in zip(order, out):
            results[i] = result
        return results

    def _release(self) -> None:
        if self._decoder is not None:
            self._decoder.release()
        if self._vision is not None:
            self._vision.encode.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ fast path

    def _setup(self) -> None:
        """Built at the first fast batch: the model is quantized by then (the features' namespace needs it)."""
        if self._vision is not None:
            return
        wrapper, parts = self.wrapper, self.parts
        disk = None
        if wrapper.args.feature_cache:
            if vision_in_fp(wrapper.recipe):
                namespace = feature_namespace(wrapper.model, wrapper.processor, parts.lm_prefixes,
                                              vision_recipe(wrapper.recipe))
                disk = DiskFeatures(wrapper.args.feature_cache, namespace)
                log.info("lmms-quant: image features cached under %s", disk.dir)
            else:
                log.info("lmms-quant: this recipe quantizes the vision tower or connector; feature_cache unused")
        memory = FeatureMemory(FEATURE_MEMORY_BYTES.get(self.device.type, FEATURE_MEMORY_BYTES["cpu"]))
        self._vision = VisionFeatures(parts, wrapper.processor, wrapper.processor_inputs, self.device, memory, disk)
        self._decoder = StaticCacheDecoder(parts, self.device, use_graph=self.device.type == "cuda")

    def _serve_fast(self, rows: list[Row], greedy: Greedy, stops: list[str], results: list, ready: dict,
                    bar=None) -> None:
        self._setup()
        rows = order_rows(rows)
        shape = f"fast:{greedy.max_new_tokens}:{math.ceil(len(rows[0].ids) / 256) * 256}"

        def serve(batch: list[Row], size: int) -> list:
            try:
                tokens = self._generate(batch, greedy, size, ready)
            except Exception as err:  # wrapped: an out-of-memory error inside still reads as one (is_out_of_memory)
                where = ", ".join(r.request.where for r in batch)
                raise RuntimeError(f"{type(self.wrapper).__name__}: generation failed for {where}: {err}") from err
            started = time.perf_counter()
            self._finish(batch, tokens.cpu(), stops, results)
            self.clock.add("finish", time.perf_counter() - started)
            if bar is not None:
                bar.update(len(batch))
            return []  # the results are written in place

        self.sizing.serve(rows, shape, serve)

    def _generate(self, batch: list[Row], greedy: Greedy, size: int, ready: dict | None = None) -> torch.Tensor:
        keys, images, prompts = [], [], []
        for row in batch:
            if row.group not in keys:
                keys.append(row.group)
                images.append(row.image)
                prompts.append(row.prompt)
        mark = self.clock.now()
        # Without image sharing every request is encoded (and nothing cached under a request's key).
        features = self._vision.features(keys, images, prompts, ready, cached=self.share_images)
        mark = self.clock.lap("vision", mark)
        prompts = self.layout(batch, keys, features)
        self.clock.lap("layout", mark)
        self.stats["batches"] += 1
        self.stats["distinct_images"] += len(keys)
        self.stats["prefix_tokens"] += prompts.prefix_len * len(keys)
        self.stats["suffix_tokens"] += int(prompts.suffix_valid.sum())
        self.stats["prompt_tokens"] += sum(len(r.ids) for r in batch)
        return self._decoder.generate(prompts, greedy, rows=size, clock=self.clock)

    def layout(self, batch: list[Row], keys: list[str], features: torch.Tensor) -> Prompts:
        """The batch as `Prompts`: the prefix all rows share (when it holds every image token), then suffixes."""
        parts, device = self.parts, self.device
        ids = [r.ids for r in batch]
        group = torch.tensor([keys.index(r.group) for r in batch], device=device)
        image_at = [[i for i, t in enumerate(row) if t == parts.image_token_id] for row in ids]
        for row, at in zip(batch, image_at):
            if len(at) != features.shape[1]:
                raise ValueError(f"{row.request.where}: {len(at)} image tokens in the prompt, but the image gives "
                                 f"{features.shape[1]} features")
        prefix = min(common_prefix_len(ids), min(len(r) for r in ids) - 1)
        if prefix and self.share_prefix and all(at[-1] < prefix for at in image_at):
            embeds = parts.embed(torch.tensor(ids[0][:prefix], device=device))
            prefix_embeds = embeds[None].repeat(len(keys), 1, 1)
            prefix_embeds[:, image_at[0]] = features.to(prefix_embeds.dtype)
        else:
            prefix, prefix_embeds = 0, None
        suffixes = [r[prefix:] for r in ids]
        width = max(len(s) for s in suffixes)
        pad = self.wrapper.tokenizer.pad_token_id or 0
        suffix_ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
        valid = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in suffixes], device=device)
        suffix_embeds = parts.embed(suffix_ids)
        if prefix_embeds is None:  # the image tokens are in each row's own part
            for r, at in enumerate(image_at):
                suffix_embeds[r, [width - len(ids[r]) + i for i in at]] = features[group[r]].to(suffix_embeds.dtype)
        return Prompts(prefix_embeds, group, suffix_embeds, valid)

    def _finish(self, batch: list[Row], tokens: torch.Tensor, stops: list[str], results: list) -> None:
        eos_ids = eos_token_ids(self.wrapper.model.generation_config)
        texts = self.wrapper.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for row, text, new in zip(batch, texts, tokens):
            results[row.index] = GenerationResult(
                text=truncate_at(text, stops),
                token_counts=TokenCounts(input_tokens=len(row.ids), output_tokens=count_generated(new, eos_ids)))
        self.stats["fast_requests"] += len(batch)

    def summary(self) -> dict:
        """What the path did (for benchmarks and logs): requests per path, images encoded, graph use."""
        out = dict(self.stats)
        if self._vision is not None:
            out["images_encoded"] = self._vision.images_encoded
            out["vision_tower_calls"] = self._vision.tower_calls
            out["vision_graphs"] = dict(self._vision.encode.stats)
            if self._vision.disk is not None:
                disk = self._vision.disk
                out["feature_cache"] = {"dir": str(disk.dir), "hits": disk.hits, "misses": disk.misses,
                                        "writes": disk.writes}
        if self._decoder is not None:
            out["decoder"] = dict(self._decoder.stats)
        out["time_s"] = self.clock.totals()
        out["batch_sizes"] = dict(self.sizing.sizes)
        out["pixels_prefetched"] = bool(self._prefetch)  # image transforms off the main thread
        return out


def generation_path(wrapper) -> GenerationPath:
    """The wrapper's generation path, built on first use."""
    path = getattr(wrapper, "_generation_path", None)
    if path is None:
        path = wrapper._generation_path = GenerationPath(wrapper)
    return path


__all__ = ["GenerationPath", "Row", "common_prefix_len", "generation_path", "order_rows",
           "vision_in_fp", "vision_recipe"]
