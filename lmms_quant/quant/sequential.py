"""The sequential calibration driver: a stack's block inputs captured once, then each block run alone.

For a stack of blocks (the nn.ModuleList an architecture table names), one forward of the model per
batch records every block's call: the hidden-state input of the first needed block and, for each
block, its other arguments and keyword arguments (attention masks, position embeddings, encoder
hidden states, T5's position bias). The first batch's forward runs to the last block this run needs;
a block that got the very same tensors and values as an earlier one (every OPT or Llama layer gets
one mask and one pair of position embeddings) repeats that block's call, so later forwards stop at
the last block whose call is its own (block 1 of an OPT stack: 2 of its 32 blocks run per batch,
not 31). Then, block by block:

1. the block alone runs on the held inputs of every batch, with the unit's hooks (Hessians, inputs,
   AWQ's parent calls, held-out rows);
2. the method quantizes it (`api.run_quantization`);
3. the quantized block runs again on the same inputs (`finished`): its outputs are the next block's
   inputs.

That is O(depth) block forwards, where the model driver (`calibration.Calibrator`) re-runs the model
up to every unit, O(depth²). The statistics are that driver's: each block sees the outputs of the
already-quantized blocks before it, computed by the same kernels on the same tensors, batch by batch.

Assumptions, checked where they can be: a block's hidden-state input is the previous block's first
output (checked on the first batch); a block's other arguments do not depend on the weights of the
earlier blocks of its stack (true of masks, position embeddings, encoder states, T5's relative
position bias); keyword tensors are not changed in place after the call (checked by version
counters). A stack that fails a check, units outside a stack (projectors, heads) and models
dispatched by accelerate go through the model driver, which also moves from one stack to the next
(ViT -> Q-Former -> projection -> LM) by running the model once up to the next stack, reusing the
stored outputs of finished components.

Memory: once a stack is captured and every later unit is one of its blocks, the stored outputs of the
components before it (`output_cache.OutputCache`) are dropped. Captured hidden states stay on the
model's device, in its dtype, up to
``LMMS_QUANT_SEQUENTIAL_DEVICE_MB`` (default 4096 MiB, for one block's inputs and the outputs being
made); past it, further batches are held on the CPU and moved in when run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .archs import Unit
from .calibration import Calibrator, UnitStats, _first_tensor, _UnitDone, check_unchanged, recorded_kwargs

DEFAULT_DEVICE_MB = 4096


@dataclass
class _BlockCall:
    """A block's call on one batch, without its hidden-state input."""

    rest: tuple  # positional arguments after the hidden state (all of them when it came by keyword)
    kwargs: dict
    versions: dict  # keyword tensor -> version counter when recorded
    by_keyword: bool  # the hidden state came as ``hidden_states=``


def _same_value(a, b) -> bool:
    """The same argument: the very tensor (not an equal one), and equal containers or plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # a value whose comparison is not a bool: not known to be the same
        return False


def _same_call(a: _BlockCall, b: _BlockCall) -> bool:
    return (a.by_keyword == b.by_keyword and _same_value(a.rest, b.rest) and a.kwargs.keys() == b.kwargs.keys()
            and all(_same_value(a.kwargs[k], b.kwargs[k]) for k in a.kwargs))


def _templates(calls: dict[int, _BlockCall], first: int, last: int) -> dict[int, int]:
    """Block -> the block whose recorded call it repeats (itself if none), from one forward's calls.

    Blocks ``first`` and ``first + 1`` are always their own: a first block may get what it makes for
    the others (T5's position bias: None into block 0, its output into every later block). A later
    block is another's repeat when it got the very same tensors and values (one mask, one pair of
    position embeddings passed to every layer), checked against the blocks kept so far; Gemma 3's
    sliding and full attention layers make two such templates."""
    out: dict[int, int] = {}
    kept: list[int] = []
    for j in range(first, last + 1):
        like = None if j <= first + 1 else next((k for k in kept if _same_call(calls[k], calls[j])), None)
        out[j] = j if like is None else like
        if like is None:
            kept.append(j)
    return out


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, _BlockCall]:
    by_keyword = not args
    hidden = kwargs["hidden_states"] if by_keyword else args[0]
    kwargs, versions = recorded_kwargs({k: v for k, v in kwargs.items() if not (by_keyword and k == "hidden_states")})
    return hidden, _BlockCall(tuple(args[1:]), kwargs, versions, by_keyword)


class _StackState:
    """What the driver holds for the stack being calibrated."""

    def __init__(self, name: str, blocks, index: int, last: int):
        self.name, self.blocks, self.index, self.last = name, blocks, index, last
        self.hidden: dict[str, list[torch.Tensor]] = {}  # phase -> the current block's input, per batch
        self.calls: dict[str, list[dict[int, _BlockCall]]] = {}  # phase -> per batch, block index -> its call


def _device_clock(device) -> float:
    """The host's clock once the device is idle (a wait per stack capture: its time is its own)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SequentialCalibrator(Calibrator):
    """`Calibrator` whose stack units are calibrated block by block on captured inputs (see module doc)."""

    def __init__(self, model, calib_batches, holdout_batches, *, units: Sequence[Unit], need_calib: bool, seed: int,
                 device=None, dtype=None, progress=None, device_budget_bytes: int | None = None):
        super().__init__(model, calib_batches, holdout_batches, seed=seed, device=device, dtype=dtype,
                         progress=progress)
        self.need_calib = need_calib
        self.units = list(units)
        self.last_block: dict[str, int] = {}
        for unit in units:
            if unit.site.stack is not None and unit.site.block is not None:
                self.last_block[unit.site.stack] = max(self.last_block.get(unit.site.stack, -1), unit.site.block)
        if device_budget_bytes is None:
            device_budget_bytes = int(os.environ.get("LMMS_QUANT_SEQUENTIAL_DEVICE_MB", DEFAULT_DEVICE_MB)) * 2**20
        self.budget = device_budget_bytes
        self.on_device = 0
        self.state: _StackState | None = None
        self.not_replayable: dict[str, str] = {}  # stack -> why it went through the model driver
        self.block_forwards = 0
        self.capture_passes = 0
        self.capture_s = 0.0  # wall seconds in `_capture` (the forwards up to a stack's first needed block)

    # ------------------------------------------------------------------ the driver's steps

    def collect(self, unit: Unit, *, hessian: bool = False, inputs: bool = False,
                calls: Sequence[str] = ()) -> UnitStats:
        stack, index = unit.site.stack, unit.site.block
        if stack is None or index is None or stack in self.not_replayable or getattr(self.model, "hf_device_map", None):
            self._drop_state()
            return super().collect(unit, hessian=hessian, inputs=inputs, calls=calls)
        if self.state is None or self.state.name != stack or self.state.index > index:
            self._drop_state()
            started = _device_clock(self.device)
            why = self._capture(unit)
            self.capture_s += _device_clock(self.device) - started
            if why:
                self.not_replayable[stack] = why
                return super().collect(unit, hessian=hessian, inputs=inputs, calls=calls)
        while self.state.index < index:  # blocks between the selected ones are run as they are
            self._advance()
        need_calib = hessian or inputs or bool(calls)
        stats = self.new_stats(unit, hessian=hessian, inputs=inputs, calls=calls)
        state = {"phase": "calib", "batch": None, "fired": set()}
        self.run_hooked(unit, stats, state, (
            (phase, batch, lambda phase=phase, position=position: self._run_block(index, phase, position))
            for phase, position, batch in self._passes(need_calib)))
        return stats

    def finished(self, unit: Unit) -> None:
        state = self.state
        if state is None or unit.site.stack != state.name or unit.site.block != state.index:
            return
        if state.index >= state.last:
            self._drop_state()  # no later block of this stack is calibrated: its outputs are not needed
        else:
            self._advance()

    # ------------------------------------------------------------------ capture and replay

    def _passes(self, need_calib: bool):
        phases = [("calib", self.calib_batches)] if need_calib else []
        phases.append(("holdout", self.holdout_batches))
        return [(phase, i, batch) for phase, batches in phases for i, batch in enumerate(batches)]

    def _capture(self, unit: Unit) -> str | None:
        """Record the stack's block calls on every batch; the reason it cannot be replayed, or None."""
        name, first = unit.site.stack, unit.site.block
        last = self.last_block[name]
        blocks = self.model.get_submodule(name)
        state = _StackState(name, blocks, first, last)
        record: dict = {}
        outputs: dict[int, torch.Tensor] = {}
        check = {"on": True, "broken": None}
        # After the first forward (which runs to the last block): where later forwards may stop, and
        # which block's call each later block repeats (`_templates`).
        plan = {"stop": last, "templates": None}

        def pre_hook(j):
            def hook(module, args, kwargs):
                hidden, call = _split(args, kwargs)
                if check["on"] and j > first:
                    previous = outputs.get(j - 1)
                    same = previous is not None and (hidden is previous or (
                        hidden.shape == previous.shape and hidden.dtype == previous.dtype and torch.equal(hidden, previous)))
                    if not same:
                        check["broken"] = f"block {j}'s input is not block {j - 1}'s output"
                if j == first:
                    record["hidden"] = hidden.detach().clone()
                record[j] = call
                if j == plan["stop"]:
                    raise _UnitDone
            return hook

        def post_hook(j):
            def hook(module, args, output):
                if check["on"]:
                    outputs[j] = _first_tensor(output)
            return hook

        cache_state = {"phase": "calib", "batch_id": None}
        cached = self.cache.wrap(self.model, unit, cache_state)
        handles, captured = [], False
        try:
            for j in range(first, last + 1):
                handles.append(blocks[j].register_forward_pre_hook(pre_hook(j), with_kwargs=True))
                if j < last:
                    handles.append(blocks[j].register_forward_hook(post_hook(j)))
            for phase, batch in self.passes(self.need_calib):
                record.clear()
                cache_state.update(phase=phase, batch_id=id(batch))
                try:
                    batch.run(self.model, self.device, self.dtype)
                except _UnitDone:
                    pass
                self.capture_passes += 1
                if check["broken"]:
                    return check["broken"]
                if "hidden" not in record or any(j not in record for j in range(first, plan["stop"] + 1)):
                    return f"blocks {first}..{last} of {name} are not all called in one forward"
                if plan["templates"] is None:
                    # The blocks that repeat an earlier block's call need not be reached again: later
                    # forwards stop at the last block whose call is its own (all of them, for a stack
                    # whose blocks get different arguments).
                    plan["templates"] = _templates(record, first, last)
                    plan["stop"] = max(plan["templates"].values())
                check["on"] = False
                outputs.clear()
                state.hidden.setdefault(phase, []).append(self._hold(record["hidden"]))
                state.calls.setdefault(phase, []).append(
                    {j: record[plan["templates"][j] if j > plan["stop"] else j] for j in range(first, last + 1)})
            captured = True
            if self._only_this_stack_after(unit):
                # Every later unit is a block of this stack, served from the captured inputs: the stored
                # outputs of the components before it (LLaVA's vision tower with all its hidden states:
                # 0.85 GiB on LLaVA-7B) would only be held to the end of the run.
                self.cache.clear()
        finally:
            for handle in handles:
                handle.remove()
            self.cache.unwrap(cached)
            if not captured:  # a stack that cannot be replayed: what was held for it is given back
                for held in state.hidden.values():
                    for tensor in held:
                        self._release(tensor)
        self.state = state
        return None

    def _only_this_stack_after(self, unit: Unit) -> bool:
        position = next((i for i, u in enumerate(self.units) if u is unit), None)
        if position is None:
            return False
        stack = unit.site.stack
        return all(u.site.stack == stack and u.site.block is not None for u in self.units[position + 1:])

    def _run_block(self, index: int, phase: str, position: int):
        state = self.state
        call = state.calls[phase][position][index]
        check_unchanged(call.kwargs, call.versions, f"{state.name}.{index}",
                        " by the sequential driver (LMMS_QUANT_CALIB_DRIVER=model)")
        hidden = state.hidden[phase][position]
        if hidden.device.type == "cpu" and torch.device(self.device).type != "cpu":
            hidden = hidden.to(self.device)  # held on the CPU past the device budget
        self.block_forwards += 1
        block = state.blocks[index]
        if call.by_keyword:
            return block(*call.rest, hidden_states=hidden, **call.kwargs)
        return block(hidden, *call.rest, **call.kwargs)

    def _advance(self) -> None:
        """Run the current block (quantized or not) on its inputs: they become the next block's."""
        state = self.state
        for phase, held in state.hidden.items():
            for position in range(len(held)):
                output = _first_tensor(self._run_block(state.index, phase, position)).detach()
                self._release(held[position])
                held[position] = self._hold(output)
        state.index += 1

    # ------------------------------------------------------------------ memory

    def _hold(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" and self.on_device + size > self.budget:
            return tensor.to("cpu")
        if tensor.device.type != "cpu":
            self.on_device += size
        return tensor

    def _release(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            self.on_device -= tensor.numel() * tensor.element_size()

    def _drop_state(self) -> None:
        if self.state is not None:
            for held in self.state.hidden.values():
                for tensor in held:
                    self._release(tensor)
        self.state = None


__all__ = ["SequentialCalibrator"]
