"""Greedy decoding on a static KV cache, each decode step replayed as one CUDA graph.

Stock ``generate`` grows a dynamic cache, rebuilds the attention mask and runs the logits
processors and stopping criteria in Python at every step; at batch 64 that host work, not the GPU,
sets the pace. Here one batch is decoded in three phases:

1. **prefix**: the tokens every row of the batch shares in its prompt (the image tokens and the
   template around them) run once per *group* — one group per image — into a dynamic cache, which is
   then gathered row by row into the static cache (slots ``[0, P)``);
2. **suffix**: each row's own tokens (its question), left-padded within slots ``[P, P+S)``, run in
   one forward against the prefix; its last logits give the first new token;
3. **decode**: one token per step at slot ``P+S+k``. The step reads and writes only persistent
   buffers (token, position, key-validity, slot and output indices, finished flags), so on CUDA it is
   captured once as a graph and replayed; on CPU (or if capture fails) the same function runs eagerly.

Every query sees exactly the keys the stock path's query sees: its prefix, its own real suffix
tokens and the tokens it generated (a 4-D additive mask over the static cache); positions count real
tokens only, as stock generation derives them from the attention mask. So the greedy tokens are the
stock path's (to float rounding; the tests check token equality on trained models). What is
decoded is plain greedy search; `greedy_settings` sends everything else back to stock ``generate``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# GenerationConfig fields that may differ from their defaults without changing plain greedy search.
NEUTRAL_FIELDS = frozenset({
    "max_new_tokens", "max_length", "pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id",
    "do_sample", "num_beams", "num_return_sequences", "use_cache", "cache_implementation", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "transformers_version",
    "_from_model_config", "temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff",
})
# How often the host asks whether every row has finished (each ask waits for the GPU).
CHECK_EVERY = 8
LENGTH_BUCKET = 32  # cache lengths are rounded up so that batches of similar prompts share one graph


@dataclass(frozen=True)
class Greedy:
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def greedy_settings(generation_config, kwargs: dict) -> Greedy | str:
    """The plain-greedy decode stock ``generate`` would run with ``kwargs``, or why it is something else."""
    config = copy.deepcopy(generation_config)
    config.update(**kwargs)
    diff = config.to_diff_dict()
    if config.do_sample:
        return "sampling (do_sample)"
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return f"beam search (num_beams={config.num_beams}, num_return_sequences={config.num_return_sequences})"
    if config.return_dict_in_generate or config.output_scores or config.output_logits:
        return "scores or dict outputs are requested"
    if not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1:
        return f"max_new_tokens={config.max_new_tokens!r} (only max_new_tokens >= 1 is served)"
    other = sorted(k for k in diff if k not in NEUTRAL_FIELDS)
    if other:
        return f"generation settings that change greedy search: {', '.join(other)}"
    eos = config.eos_token_id
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return Greedy(max_new_tokens=int(config.max_new_tokens), eos_token_ids=eos, pad_token_id=int(pad))


@dataclass
class Prompts:
    """One batch laid out for the cache: a prefix per group, then each row's own suffix.

    ``prefix_embeds`` (groups, P, H) or None when P = 0; ``group_of_row`` (rows,) index into the groups;
    ``suffix_embeds`` (rows, S, H) with each row's tokens right-aligned; ``suffix_valid`` (rows, S) bool.
    """

    prefix_embeds: torch.Tensor | None
    group_of_row: torch.Tensor
    suffix_embeds: torch.Tensor
    suffix_valid: torch.Tensor

    @property
    def rows(self) -> int:
        return self.suffix_embeds.shape[0]

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_embeds is None else self.prefix_embeds.shape[1]

    def padded_to(self, rows: int) -> "Prompts":
        """Extra rows copying row 0, so that every batch has the shape the graph was captured for."""
        extra = rows - self.rows
        if extra <= 0:
            return self
        take = torch.cat([torch.arange(self.rows), torch.zeros(extra, dtype=torch.long)]).to(self.suffix_embeds.device)
        return Prompts(self.prefix_embeds, self.group_of_row[take], self.suffix_embeds[take], self.suffix_valid[take])


class PhaseClock:
    """Seconds per named phase: CUDA events on a GPU (read once the batch is done, no extra waits), wall
    time on a CPU. Tells where an evaluation's time goes (vision, prefill, decode, waiting for the CPU)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self._seconds: dict[str, float] = {}
        self._events: list = []

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, name: str, since):
        end = self.now()
        if self.cuda:
            self._events.append((name, since, end))
        else:
            self.add(name, end - since)
        return end

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def settle(self) -> None:
        """Read the recorded events (call when the GPU has passed them, e.g. after copying results back)."""
        for name, start, end in self._events:
            end.synchronize()
            self.add(name, start.elapsed_time(end) / 1000)
        self._events.clear()

    def totals(self) -> dict[str, float]:
        self.settle()
        return dict(self._seconds)


class _State:
    """The static cache and every buffer one decode step reads and writes, for one (rows, length)."""

    def __init__(self, parts, rows: int, length: int, greedy: Greedy, device, dtype):
        from transformers import StaticCache

        self.rows, self.length, self.greedy = rows, length, greedy
        self.cache = StaticCache(config=parts.lm_config, max_cache_len=length)
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, 1, **long)
        self.positions = torch.zeros(rows, 1, **long)
        self.slot = torch.zeros(1, **long)
        self.step = torch.zeros(1, **long)
        self.out = torch.zeros(rows, greedy.max_new_tokens, **long)
        self.kv_valid = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos = torch.tensor(greedy.eos_token_ids, **long)
        self.pad = torch.tensor(greedy.pad_token_id, **long)
        self.mask_dtype = dtype
        self.graph = None
        self.graph_error: str | None = None

    def mutable(self) -> list[torch.Tensor]:
        counters = [layer.cumulative_length for layer in self.cache.layers]
        return [self.tokens, self.positions, self.slot, self.step, self.out, self.kv_valid, self.finished, *counters]


class StaticCacheDecoder:
    """Decodes `Prompts` greedily; keeps one static cache (and its graph) for the last batch shape."""

    def __init__(self, parts, device: torch.device, use_graph: bool):
        self.parts = parts
        self.device = torch.device(device)
        self.use_graph = use_graph and self.device.type == "cuda"
        self.dtype = parts.embed_dtype
        self._cache_kw = parts.cache_kwarg()
        self._keep_logits = parts.keeps_logits()
        self._state: _State | None = None
        self.clock = PhaseClock(self.device)
        self.stats = {"graph_captures": 0, "graph_replays": 0, "eager_steps": 0, "graph_error": None, "batches": 0}

    # ------------------------------------------------------------------ forward

    def _logits(self, cache, **inputs) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True, **inputs}
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        return self.parts.lm(**kwargs).logits[:, -1]

    def _state_for(self, rows: int, length: int, greedy: Greedy) -> _State:
        """The current state if it fits (a longer cache only adds masked slots), else a new one.

        Rows come longest prompts first, so the first batch of a task sizes the cache for the rest and the
        graph is captured once per task."""
        state = self._state
        if state is None or (state.rows, state.greedy) != (rows, greedy) or state.length < length:
            self._state = None  # free the old cache before allocating the new one
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._state = _State(self.parts, rows, length, greedy, self.device, self.dtype)
        return self._state

    def release(self) -> None:
        self._state = None

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def generate(self, prompts: Prompts, greedy: Greedy, rows: int | None = None,
                 clock: PhaseClock | None = None) -> torch.Tensor:
        """(real rows, n) new token ids, pad after each row's EOS, n = the step at which all rows ended."""
        clock = clock or self.clock
        real = prompts.rows
        prompts = prompts.padded_to(rows or real)
        P, S, N = prompts.prefix_len, prompts.suffix_embeds.shape[1], greedy.max_new_tokens
        length = -(-(P + S + N) // LENGTH_BUCKET) * LENGTH_BUCKET
        state = self._state_for(prompts.rows, length, greedy)
        state.cache.reset()
        mark = clock.now()
        first = self._prefill(state, prompts)
        self._start_decode(state, prompts, first)
        mark = clock.lap("prefill", mark)
        steps = 1
        while steps < N:
            if steps % CHECK_EVERY == 0 and bool(state.finished.all()):
                break
            self._step_once(state)
            steps += 1
        clock.lap("decode", mark)
        out = _trim(state.out[:real, :steps], state.eos, state.pad)  # waits for the GPU
        clock.settle()
        self.stats["batches"] += 1
        return out

    def _prefill(self, state: _State, prompts: Prompts) -> torch.Tensor:
        from transformers import DynamicCache

        P, S, L = prompts.prefix_len, prompts.suffix_embeds.shape[1], state.length
        device = self.device
        if P:
            shared = DynamicCache(config=self.parts.lm_config)
            groups = prompts.prefix_embeds.shape[0]
            self._logits(shared, inputs_embeds=prompts.prefix_embeds,
                         position_ids=torch.arange(P, device=device).expand(groups, P))
            rows = prompts.group_of_row.to(device)
            for static_layer, layer in zip(state.cache.layers, shared.layers):
                static_layer.update(layer.keys[rows], layer.values[rows])  # writes slots [0, P)
        valid = prompts.suffix_valid.to(device)
        state.kv_valid.zero_()
        state.kv_valid[:, :P] = True
        state.kv_valid[:, P:P + S] = valid
        keys = torch.arange(L, device=device)
        queries = P + torch.arange(S, device=device)
        allowed = state.kv_valid[:, None, :] & (keys[None, None, :] <= queries[None, :, None])
        allowed |= keys[None, None, :] == queries[None, :, None]  # a padding query sees itself (no empty row)
        mask = _additive(allowed[:, None], self.dtype)
        positions = torch.where(valid, P + valid.long().cumsum(1) - 1, torch.zeros_like(valid, dtype=torch.long))
        logits = self._logits(state.cache, inputs_embeds=prompts.suffix_embeds, attention_mask=mask,
                              position_ids=positions)
        state.positions.copy_((P + valid.sum(1))[:, None])
        return logits.argmax(-1)

    def _start_decode(self, state: _State, prompts: Prompts, first: torch.Tensor) -> None:
        state.tokens.copy_(first[:, None])
        state.slot.fill_(prompts.prefix_len + prompts.suffix_embeds.shape[1])
        state.step.fill_(1)
        state.out.fill_(state.greedy.pad_token_id)
        state.out[:, 0] = first
        state.finished.copy_(_is_eos(first, state.eos))

    # ------------------------------------------------------------------ the decode step

    def _step(self, state: _State) -> None:
        """One greedy step on persistent buffers only (what a CUDA graph replays)."""
        state.kv_valid.index_fill_(1, state.slot, True)
        mask = _additive(state.kv_valid[:, None, None, :], self.dtype)
        logits = self._logits(state.cache, input_ids=state.tokens, attention_mask=mask, position_ids=state.positions)
        token = torch.where(state.finished, state.pad, logits.argmax(-1))
        state.out.index_copy_(1, state.step, token[:, None])
        state.finished |= _is_eos(token, state.eos)
        state.tokens.copy_(token[:, None])
        state.positions.add_(1)
        state.slot.add_(1)
        state.step.add_(1)

    def _step_once(self, state: _State) -> None:
        if self.use_graph and state.graph is None and state.graph_error is None:
            self._capture(state)
        if state.graph is not None:
            state.graph.replay()
            self.stats["graph_replays"] += 1
        else:
            self._step(state)
            self.stats["eager_steps"] += 1

    def _capture(self, state: _State) -> None:
        """Capture `_step` as a CUDA graph; the warm-up runs on the real state, which is then restored."""
        saved = []
        try:
            saved = [t.clone() for t in state.mutable()]
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(state)  # warm-up: lazy allocations and kernel selection happen outside the capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the threads preparing the next requests (CPU work) must not void this capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step(state)
            state.graph = graph
            self.stats["graph_captures"] += 1
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager steps
            state.graph_error = self.stats["graph_error"] = f"{type(err).__name__}: {err}"
            log.warning("lmms-quant: decode step not captured as a CUDA graph (%s); decoding eagerly", err)
            torch.cuda.synchronize(self.device)
        finally:
            for tensor, value in zip(state.mutable(), saved):
                tensor.copy_(value)


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """(rows,) bool; a broadcast compare (always graph-capturable; False for every row when there is no EOS)."""
    return (tokens[:, None] == eos[None, :]).any(dim=1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest value elsewhere (works for eager and SDPA)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _trim(out: torch.Tensor, eos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Cut the columns after every row has produced EOS, as stock generation stops there."""
    if eos.numel() == 0 or out.shape[1] == 0:
        return out
    hit = torch.isin(out, eos)
    if not bool(hit.any(dim=1).all()):
        return out
    last = int(hit.float().argmax(dim=1).max())  # first EOS per row; the latest of those
    return out[:, :last + 1]


__all__ = ["CHECK_EVERY", "Greedy", "LENGTH_BUCKET", "NEUTRAL_FIELDS", "PhaseClock", "Prompts", "StaticCacheDecoder",
           "greedy_settings"]
