"""Calibration capture: layer inputs of each unit while the real model runs on calibration batches.

`Calibrator.collect(unit)` runs the whole model on every batch (`calib_data.Batch`) with forward
pre-hooks on the unit's Linears, and stops each forward (an exception from a hook) as soon as the
unit has run. Because earlier units are already quantized when a later one is collected, every unit
sees the outputs of the quantized units before it, in any architecture, without re-implementing
block call signatures. Padding tokens are dropped where the table names the mask that marks them.
Finished components' outputs are reused (`output_cache.OutputCache`).

The data side (sources, samples, prompt styles, batches) is `calib_data`; its names are re-exported.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .archs import MatmulView, Unit
from .calib_data import (CAPTION_INSTRUCTION, Batch, CalibSample, check_not_evaluated, load_samples,  # noqa: F401
                         make_batch, make_batches, sample_from_text)
from .output_cache import OutputCache
from .quantizer import tf32_products

# --------------------------------------------------------------------------- capture


class _UnitDone(Exception):
    """Raised from a hook to stop a forward once the unit being calibrated has run."""


@dataclass
class ModuleCall:
    """One recorded call of a module on a calibration batch, to be replayed (AWQ's block-output search):
    its positional and keyword arguments (tensors as they were passed) and the batch's token masks."""

    args: tuple
    kwargs: dict
    masks: dict
    versions: dict = field(default_factory=dict)  # keyword tensor -> its version counter when recorded

    def replay(self, module):
        """``module``'s output on this call: the first tensor of what it returns."""
        check_unchanged(self.kwargs, self.versions, "recorded call")
        return _first_tensor(module(*self.args, **self.kwargs))

    @classmethod
    def record(cls, args, kwargs, masks) -> "ModuleCall":
        # Positional inputs are cloned (the caller may update them in place after the call).
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs, versions = recorded_kwargs(kwargs)
        return cls(args, kwargs, masks, versions)


def recorded_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """A recorded call's keyword arguments (KV caches dropped) and their tensors' version counters:
    the tensors (masks, position embeddings, shared across blocks) are kept, not cloned, and checked
    unchanged before the call is replayed (`check_unchanged`)."""
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    return kwargs, {k: v._version for k, v in kwargs.items() if isinstance(v, torch.Tensor)}


def check_unchanged(kwargs: dict, versions: dict, what: str, hint: str = "") -> None:
    for key, version in versions.items():
        if kwargs[key]._version != version:
            raise RuntimeError(f"{what}: keyword argument {key!r} was modified in place after the call; it "
                               f"cannot be replayed{hint}")


def _is_cache(value) -> bool:
    # A key/value cache object would be extended by a replay; calibration runs without one.
    return type(value).__name__.endswith("Cache") and not isinstance(value, torch.Tensor)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"a module output of type {type(output).__name__} has no leading tensor")


class UnitStats(dict):
    """Linear name -> `LayerStats` for one unit (one object for Linears that read the same input tensor),
    plus ``calls``: module name -> its recorded calibration calls (`ModuleCall`), for the modules a
    method asked to replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: dict[str, list[ModuleCall]] = {}
        self.call_modules: dict[str, torch.nn.Module] = {}
        self.shared_with: dict[str, str] = {}  # Linear -> the Linear whose input (and LayerStats) it shares
        self.decided: set[str] = set()

    def groups(self, names) -> list[list[str]]:
        """``names`` grouped by shared input, in order (a Linear alone is a group of one)."""
        out: dict[str, list[str]] = {}
        for name in names:
            out.setdefault(self.shared_with.get(name, name), []).append(name)
        return list(out.values())


# fp16 and bf16 values are exact in TF32 (10 mantissa bits, 8 exponent bits) and the product of two of
# them is exact in float32, but a tensor core's sum is not a full float32 sum: on an H200 the result
# is ~1e-5 off the float32 Hessian (Frobenius, relative; `bench_gpu --check-reference`), ~1e-4 of
# the largest diagonal entry elementwise. GPTQ's damped Hessians take that (layer errors equal to
# llm-compressor's float32 Hessians, benchmarks/RESULTS.md) at ~8x the speed of float32 SIMT (the
# Hessians were most of LLaVA-7B's calibration time); AWQ's input factors, which must resolve XᵀX's
# smallest eigenvalues, sum in float64 (`awq_scoring.input_factor`). A float32 model's activations
# are not exact in TF32 and keep full float32 products.
TF32_EXACT = (torch.float16, torch.bfloat16)
_HALF_GRAM: dict = {}  # CUDA device -> whether torch.mm takes fp16/bf16 with a float32 out_dtype there


def _half_gram_supported(device: torch.device) -> bool:
    key = str(device)
    if key not in _HALF_GRAM:
        try:
            probe = torch.ones(2, 2, device=device, dtype=torch.float16)
            _HALF_GRAM[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _HALF_GRAM[key] = False
    return _HALF_GRAM[key]


def add_gram(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """hessian += xᵀx, in float32.

    On CUDA, for fp16/bf16 rows, the product is taken on the half-precision rows themselves with a
    float32 result (``torch.mm(..., out_dtype=float32)``): each product of two such values is exact in
    float32, the sums are the tensor cores' (see `TF32_EXACT`'s note), at twice the TF32 rate and
    without a float32 copy of the rows. Elsewhere: the widened rows, in TF32 on CUDA where the inputs
    are exact in it (`TF32_EXACT`), else full float32."""
    if x.is_cuda and x.dtype in TF32_EXACT and _half_gram_supported(x.device):
        hessian.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        return
    xf = x.float()
    with tf32_products(x.is_cuda and x.dtype in TF32_EXACT):
        hessian.addmm_(xf.T, xf)


class LayerStats:
    """What the calibration passes saw at one Linear's input.

    ``hessian``: sum of x x^T over calibration tokens (fp32); ``inputs``: a seeded row subsample of
    calibration inputs; ``holdout``: a row subsample of held-out inputs (for the report's errors)."""

    def __init__(self, in_features: int, *, hessian: bool, inputs: bool, rows_per_batch: int,
                 holdout_rows_per_batch: int, seed: int):
        self.in_features = in_features
        self.want_hessian, self.want_inputs = hessian, inputs
        self.hessian: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None  # sum of |x| over calibration tokens (with inputs)
        self.n_calib = 0
        self._inputs: list[torch.Tensor] = []
        self._holdout: list[torch.Tensor] = []
        self.rows_per_batch = rows_per_batch
        self.holdout_rows_per_batch = holdout_rows_per_batch
        self.generator = torch.Generator().manual_seed(seed)

    def _subsample(self, x: torch.Tensor, cap: int) -> torch.Tensor:
        if x.shape[0] <= cap:
            return x.clone()  # held past the forward: never a view of the model's activations
        keep = torch.randperm(x.shape[0], generator=self.generator)[:cap].sort().values
        # from pinned memory the copy to a GPU is queued, not waited for
        keep = keep.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else keep.to(x.device)
        return x[keep]

    def add(self, x: torch.Tensor, phase: str) -> None:
        """Add a batch's input rows. Held rows keep the model's dtype (half the memory of float32 for
        a half-precision model; their float32 values are the same): users convert them as they read."""
        if phase == "calib":
            self.n_calib += x.shape[0]
            if self.want_hessian:
                if self.hessian is None:
                    self.hessian = torch.zeros(self.in_features, self.in_features, device=x.device)
                add_gram(self.hessian, x)
            if self.want_inputs:
                self._inputs.append(self._subsample(x, self.rows_per_batch))
                total = x.abs().sum(dim=0, dtype=torch.float32)
                self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        else:
            self._holdout.append(self._subsample(x, self.holdout_rows_per_batch))

    @property
    def inputs(self) -> torch.Tensor | None:
        if len(self._inputs) > 1:
            self._inputs = [torch.cat(self._inputs)]  # once: Linears sharing this object read it too
        return self._inputs[0] if self._inputs else None

    @property
    def abs_mean(self) -> torch.Tensor | None:
        """mean |x| per input channel over every calibration token (AWQ's activation statistic)."""
        return None if self.abs_sum is None else self.abs_sum / max(1, self.n_calib)

    @property
    def holdout(self) -> torch.Tensor | None:
        if len(self._holdout) > 1:
            self._holdout = [torch.cat(self._holdout)]
        return self._holdout[0] if self._holdout else None

    def data_flag(self) -> bool | torch.Tensor:
        """Whether calibration data reached this input and was not all zero: a python bool where
        that decides it, else a 0-dim bool tensor, so that a caller checking several Linears reads
        the device once for all of them."""
        if self.n_calib == 0:
            return False
        if self.hessian is not None:
            return torch.any(self.hessian != 0)
        if self._inputs:
            return torch.stack([torch.any(x != 0) for x in self._inputs]).any()
        return True


def _tokens(x: torch.Tensor, masks, mask_key: str | None, where: str) -> torch.Tensor:
    """The input rows of real tokens (``masks``: the batch's `calib_data.TokenMasks`)."""
    mask = masks.get(mask_key)
    if mask is not None:
        # (batch, seq, d), or flattened to (batch * seq, d) as OPT does before its feed-forward.
        matches = tuple(x.shape[:-1]) == tuple(mask.shape) or (x.dim() == 2 and x.shape[0] == mask.numel())
        if not matches:
            raise RuntimeError(f"{where}: input {tuple(x.shape)} does not match its token mask {tuple(mask.shape)}; "
                               f"the architecture table names the wrong mask")
        return masks.real_rows(x, mask_key)
    return x.reshape(-1, x.shape[-1])


class Calibrator:
    """Runs calibration and held-out batches through ``model`` and captures unit inputs."""

    MAX_INPUT_ROWS = 16384  # calibration rows kept per Linear for AWQ's search
    MAX_HOLDOUT_ROWS = 4096  # held-out rows kept per Linear for the report

    def __init__(self, model, calib_batches: list[Batch], holdout_batches: list[Batch], *, seed: int,
                 device=None, dtype=None, progress=None):
        self.model = model
        self.calib_batches = calib_batches
        self.holdout_batches = holdout_batches
        self.seed = seed
        self.device = device if device is not None else model.device
        self.dtype = dtype if dtype is not None else model.dtype
        self.progress = progress
        self.cache = OutputCache(int(os.environ.get("LMMS_QUANT_CALIB_CACHE_MB", "1024")) * 2**20)

    def new_stats(self, unit: Unit, *, hessian: bool, inputs: bool, calls: Sequence[str]) -> UnitStats:
        rows = math.ceil(self.MAX_INPUT_ROWS / max(1, len(self.calib_batches)))
        holdout_rows = math.ceil(self.MAX_HOLDOUT_ROWS / max(1, len(self.holdout_batches)))
        stats = UnitStats({
            t.name: LayerStats(t.module.in_features, hessian=hessian, inputs=inputs, rows_per_batch=rows,
                               holdout_rows_per_batch=holdout_rows, seed=self.seed ^ zlib.crc32(t.name.encode()))
            for t in unit.targets
        })
        stats.calls = {name: [] for name in calls}
        stats.call_modules = {name: self.model.get_submodule(name) for name in calls}
        return stats

    @staticmethod
    def install_hooks(unit: Unit, stats: UnitStats, state: dict) -> list:
        """Hooks that feed ``stats`` while the unit runs (``state``: the phase and the batch being run),
        and stop the forward (`_UnitDone`) once every Linear of the unit has seen its input.

        The first pass runs to the end of the unit's exit module. If no Linear of the unit was called
        again after the last of them first saw its input (true of every block we know), later passes
        stop right there, at that Linear's input: what is left of the unit (LLaVA's down_proj, OPT's
        fc2, the residual after them) would only make an output nobody reads."""
        names = set(stats)
        ends = {"early": None}  # None until the first pass has shown whether stopping early loses a call

        def fired(name):
            if state["complete"]:
                state["called_again"] = True
            state["fired"].add(name)

        def maybe_stop():
            if not state["complete"] and state["fired"] >= names:
                state["complete"] = True
                if ends["early"]:
                    raise _UnitDone

        def call_hook(name):
            def hook(module, args, kwargs):
                if state["phase"] == "calib":
                    stats.calls[name].append(ModuleCall.record(args, kwargs, state["batch"].masks))
            return hook

        def pre_hook(name, mask_key):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["input"]
                fired(name)
                # Linears called on the same tensor (q/k/v, gate/up, cross-attention k/v) share one
                # LayerStats: one Hessian, one input sample. Decided on their first call, checked after.
                seen = state.setdefault("seen", [])
                leader = next((n for t, key, n in seen if t is x and key == mask_key), None)
                if name not in stats.decided:
                    stats.decided.add(name)
                    if leader is not None and stats[leader].in_features == stats[name].in_features:
                        stats[name] = stats[leader]
                        stats.shared_with[name] = leader
                if name in stats.shared_with:
                    if leader != stats.shared_with[name]:
                        raise RuntimeError(f"{name}: its input was {stats.shared_with[name]}'s on the first batch but "
                                           f"not on a later one; the model's call graph changed between batches")
                    maybe_stop()
                    return
                seen.append((x, mask_key, name))
                stats[name].add(_tokens(x.detach(), state["batch"].masks, mask_key, name), state["phase"])
                maybe_stop()
            return hook

        def exit_hook(module, args, output):
            if ends["early"] is None and state["complete"]:
                ends["early"] = not state["called_again"]
            if state["fired"] >= names:
                raise _UnitDone

        handles = []
        try:
            for t in unit.targets:
                handles.append(t.module.register_forward_pre_hook(pre_hook(t.name, t.site.token_mask),
                                                                  with_kwargs=True))
                if isinstance(t.module, MatmulView):  # no module of the model calls it: run it on its input
                    handles.append(t.module.tap())
            for name, module in stats.call_modules.items():
                handles.append(module.register_forward_pre_hook(call_hook(name), with_kwargs=True))
            handles.append(unit.exit_module.register_forward_hook(exit_hook))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def passes(self, need_calib: bool) -> list[tuple[str, Batch]]:
        return ([("calib", b) for b in self.calib_batches] if need_calib else []) + [
            ("holdout", b) for b in self.holdout_batches]

    def collect(self, unit: Unit, *, hessian: bool = False, inputs: bool = False,
                calls: Sequence[str] = ()) -> UnitStats:
        """Statistics of the unit's Linears over the calibration (when ``hessian`` or ``inputs``) and
        held-out batches; ``calls``: modules whose calibration calls are recorded for replay."""
        need_calib = hessian or inputs or bool(calls)
        stats = self.new_stats(unit, hessian=hessian, inputs=inputs, calls=calls)
        state = {"phase": "calib", "batch": None, "fired": set()}
        cached = self.cache.wrap(self.model, unit, state)
        try:
            self.run_hooked(unit, stats, state, (
                (phase, batch, lambda batch=batch: batch.run(self.model, self.device, self.dtype))
                for phase, batch in self.passes(need_calib)))
        finally:
            self.cache.unwrap(cached)
        return stats

    def run_hooked(self, unit: Unit, stats: UnitStats, state: dict, passes) -> None:
        """Each pass ``(phase, batch, run)`` with the unit's hooks installed: ``run()`` drives the batch
        to the unit (the whole model, or one captured block), and the unit's exit hook may end it early."""
        handles = self.install_hooks(unit, stats, state)
        try:
            for phase, batch, run in passes:
                state.update(phase=phase, batch=batch, fired=set(), seen=[], batch_id=id(batch), complete=False,
                             called_again=False)
                try:
                    run()
                except _UnitDone:
                    pass
                if self.progress is not None:
                    self.progress.update(1)
        finally:
            for handle in handles:
                handle.remove()

    def finished(self, unit: Unit) -> None:
        """Called once the unit's quantized weights are in the model (nothing to do for this driver)."""
