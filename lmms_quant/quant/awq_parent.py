"""AWQ's scale search by the output of a fold's parent module (attention, MLP), replayed on its calls.

The parent (`awq.fold_parent`) is re-run on every recorded calibration call (`calibration.ModuleCall`)
once for its reference output, then once per candidate scale; the loss is the mean squared error of
its output on the real tokens.

On CUDA the candidate runs are one CUDA graph where the outputs are small (`GRAPH_MAX_ELEMENTS`):
every call's forward and its squared error are captured once per search, and replayed per candidate. The forwards are launch-bound chains of small
kernels (an OPT-2.7B attention on 8 captions is ~30 kernels and ~0.4 ms of host time), and a search
runs 16 calls x 20 candidates. A replay runs the kernels the capture recorded, on the buffers it
recorded: a candidate is installed by copying it into the weight tensors the parent reads, which are
the same tensors for the whole search. The whole search runs on one side stream (the capture's),
so the reference, the capture and the replays are ordered on it.

A module whose forward cannot be captured (it waits on the device, or copies from the host) is tried
again with SDPA's attention kernels other than cuDNN's, then run eagerly, with a warning; each
failure is remembered for its class (`CAPTURE_FAILURES`, with the reason). ``LMMS_QUANT_AWQ_GRAPHS=0``
turns the graphs off. The eager run is the same computation: ``scripts/bench_gpu.py --compare-eager``
checks that both pick the same scales with the same losses on the GPU benchmark's models.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch
import torch.nn as nn

from .quantizer import QuantGrid, rtn_weight
from .rtn_kernel import rtn_delta

log = logging.getLogger(__name__)

GRAPHS_ENV = "LMMS_QUANT_AWQ_GRAPHS"
_STREAMS: dict[str, "torch.cuda.Stream"] = {}
# Searches whose reference outputs hold more elements than this run eagerly: their kernels are long
# (LLaVA-7B's MLP on 128 image+caption samples: 3e8 output elements a candidate), launches cost
# nothing beside them, and a graph would only add its pool's memory.
GRAPH_MAX_ELEMENTS = 1 << 25
CANDIDATE_ELEMENTS = 1 << 25  # candidate weights made at once per Linear: 128 MiB of float32


def candidates_per_batch(weight: torch.Tensor, grid: QuantGrid, budget: int) -> int:
    """How many candidate copies of ``weight`` a batch of at most ``budget`` values holds (at least 1);
    1 for a per-tensor grid, whose one cell is the whole weight (a stack would share its range)."""
    return 1 if grid.granularity == "tensor" else max(1, budget // max(1, weight.numel()))


def scaled_rtn_weight(weight: torch.Tensor, s: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Q(W diag(s)) diag(1/s): the weight AWQ's scale s yields, in the original input coordinates."""
    return rtn_weight(weight * s[None, :], grid).div_(s[None, :])


def candidate_scales(mean_abs: torch.Tensor, n_grid: int) -> torch.Tensor:
    """Every candidate scale of the grid, (n_grid, in): s_k = a^(k / n_grid), clamped at 1e-4 and
    normalised by sqrt(max s_k * min s_k)."""
    alphas = torch.arange(n_grid, device=mean_abs.device, dtype=torch.float32) / n_grid
    s = mean_abs.float()[None, :].pow(alphas[:, None]).clamp(min=1e-4)
    return s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()


def real_tokens(y: torch.Tensor, masks, mask_key: str | None) -> torch.Tensor:
    """``masks``: the call's batch masks (`calib_data.TokenMasks`: rows by a cached index, no device wait)."""
    mask = masks.get(mask_key)
    if mask is not None and tuple(y.shape[:-1]) == tuple(mask.shape):
        return masks.real_rows(y, mask_key)
    return y.reshape(-1, y.shape[-1])


def _squared_error(parent: nn.Module, calls: list, reference: list, mask_key: str | None, device) -> torch.Tensor:
    """Sum over the calls of ||parent output - reference||² on the real tokens (0-dim, float32). A
    call's outputs are compared as they come: only the reference's are all held (0.6 GiB for a
    LLaVA-7B MLP on 128 samples)."""
    parts = []
    for call, ref in zip(calls, reference):
        diff = (real_tokens(call.replay(parent), call.masks, mask_key).float() - ref).reshape(-1)
        parts.append(torch.dot(diff, diff).to(device))  # ref promoted inside the subtraction
    return torch.stack(parts).sum()


def _graphs_wanted(device) -> bool:
    return torch.device(device).type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"


# Attention kernels a search may run under, tried in turn until its capture succeeds: first the ones
# the model picks; then SDPA without cuDNN's kernel (a suspect when a capture fails, as the reason
# recorded in `CAPTURE_FAILURES` says). The reference and the candidates always share one choice.
_KERNELS = ("model's", "sdpa_without_cudnn")
CAPTURE_FAILURES: dict[str, str] = {}  # "class / kernels" -> why its capture failed (this process)


def _kernels(choice: str):
    if choice == "model's":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _end_failed_capture() -> None:
    """After a failed capture torch may leave the CUDA generator marked as capturing (its epilogue
    runs only when the capture ends cleanly); a later random draw would then fail. An empty capture
    runs the prologue and epilogue and leaves it as it was."""
    try:
        empty = torch.cuda.CUDAGraph()
        empty.capture_begin()
        empty.capture_end()
    except Exception as err:  # nothing more to restore
        log.debug("lmms-quant: empty capture after a failed one: %s", err)


def _capture(parent: nn.Module, calls: list, reference: list, mask_key: str | None,
             device, key: str) -> Callable[[], torch.Tensor] | None:
    """A function giving the calls' squared error for the weights installed now, by one graph replay
    (a new 0-dim tensor each time); None when the parent cannot be captured. Called on the search's
    side stream. Not `torch.cuda.graph`, which synchronises and empties the allocator's cache at
    every capture."""
    graph = torch.cuda.CUDAGraph()
    try:
        # A pool of its own (torch's default), freed with the graph: a pool id shared between searches
        # cannot be captured into once its graphs are gone, and torch 2.11's host allocator asserts on a
        # user `MemPool`'s id.
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            total = _squared_error(parent, calls, reference, mask_key, device)
        finally:
            graph.capture_end()
    except Exception as err:  # e.g. a forward that reads a value back from the device
        _end_failed_capture()
        CAPTURE_FAILURES[key] = f"{type(err).__name__}: {err}"[:500]
        log.warning("lmms-quant: AWQ could not capture %s as a CUDA graph (%s)", key, CAPTURE_FAILURES[key])
        return None

    def replay() -> torch.Tensor:
        graph.replay()
        return total.clone()

    replay.graph = graph  # kept alive with the function
    return replay


def search_scale_block(parent: nn.Module, calls: list, mean_abs: torch.Tensor, linears: list[str],
                       in_parent: dict[str, nn.Module], current: dict[str, torch.Tensor], grids: list[QuantGrid],
                       n_grid: int, mask_key: str | None) -> tuple[torch.Tensor, float, float, float, list[float]]:
    """(best s, its alpha, its loss, the alpha=0 / RTN loss, every alpha's loss) by the parent's output.

    ``in_parent``: the quantized Linears inside the parent; during the search they hold their current
    (fold-adjusted, floating-point) weights, the fold's ``linears`` the candidate Q(W s)/s; their
    weights are put back afterwards. The loss is the mean squared error of the parent's output on the
    real tokens of every recorded calibration call."""
    device = mean_abs.device
    graphs = _graphs_wanted(device) and all(m.weight.device == device for m in in_parent.values())
    stream = None
    if graphs:
        if str(device) not in _STREAMS:  # one per device, the same every search
            _STREAMS[str(device)] = torch.cuda.Stream(device=device)
        stream = _STREAMS[str(device)]
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        result = _search(parent, calls, mean_abs, linears, in_parent, current, grids, n_grid, mask_key, stream)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)  # what the search made is used there next
    return result


def _search(parent, calls, mean_abs, linears, in_parent, current, grids, n_grid, mask_key, stream):
    device = mean_abs.device
    # The modules' own weight tensors are put back at the end. During the search each module reads one
    # buffer of its dtype, holding its current weight or a candidate copied in (the same tensor
    # throughout: what a captured graph reads).
    originals = {n: m.weight.data for n, m in in_parent.items()}
    buffers = {n: current[n].to(originals[n].dtype, copy=True) for n in in_parent}
    kind = type(parent).__qualname__
    choices = [c for c in _KERNELS if f"{kind} / {c}" not in CAPTURE_FAILURES] if stream is not None else []
    choices = choices or ["model's"]  # eager, on the kernels the model picks
    scales, totals = [], []
    try:
        for n, module in in_parent.items():
            module.weight.data = buffers[n]
        for attempt, choice in enumerate(choices):
            with _kernels(choice):
                reference = [real_tokens(call.replay(parent), call.masks, mask_key) for call in calls]
                n_elements = sum(r.numel() for r in reference)
                capturable = stream is not None and n_elements <= GRAPH_MAX_ELEMENTS
                loss_now = _capture(parent, calls, reference, mask_key, device, f"{kind} / {choice}") if capturable else None
                if loss_now is None and capturable and attempt + 1 < len(choices):
                    continue  # the capture failed: the next kernels, with their own reference
                if loss_now is None:
                    def loss_now():
                        return _squared_error(parent, calls, reference, mask_key, device)
                every = candidate_scales(mean_abs, n_grid)
                # the Linears' candidate weights a batch of candidates at a time (the smallest batch
                # of the Linears', so that every Linear has its candidate k ready at once)
                per_batch = min(candidates_per_batch(current[n], g, CANDIDATE_ELEMENTS) for n, g in zip(linears, grids))
                for start in range(0, n_grid, per_batch):
                    # (K, out, in) each: `scaled_rtn_weight` of the K scales, bit for bit (`rtn_kernel`)
                    batch = {n: rtn_delta(current[n], g, every[start:start + per_batch], rounded=True)
                             for n, g in zip(linears, grids)}
                    for j in range(batch[linears[0]].shape[0]):
                        for n in linears:
                            buffers[n].copy_(batch[n][j])
                        scales.append(every[start + j])
                        totals.append(loss_now())
                    del batch
                del loss_now  # the graph, and its memory, go with it
            break
    finally:
        for name, module in in_parent.items():
            module.weight.data = originals[name]
    # Read once, after the grid: a read per candidate would stall the device queue n_grid times.
    losses = [t / max(1, n_elements) for t in torch.stack(totals).tolist()]
    k = min(range(n_grid), key=losses.__getitem__)  # the first of equal losses, as the search always took
    return scales[k], k / n_grid, losses[k], losses[0], losses
