"""Outputs of finished components, reused while later units are calibrated (`OutputCache`)."""

from __future__ import annotations

import copy

import torch

from .archs import Unit


def _leaves(obj, out: list) -> bool:
    """Flatten args/kwargs/outputs into ``out``; False if a leaf is of a kind we cannot compare."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        out.append(obj)
        return True
    if isinstance(obj, dict):
        for key in obj:
            out.append(("key", key))
            if not _leaves(obj[key], out):
                return False
        return True
    if isinstance(obj, (list, tuple)):
        out.append(("len", len(obj)))
        return all(_leaves(item, out) for item in obj)
    return False


def _same_leaves(stored: list, now: list) -> bool:
    if len(stored) != len(now):
        return False
    for (a, version), b in zip(stored, now):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a._version != version:
                return False
            if a is b:
                continue
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):
                return False
        elif isinstance(b, torch.Tensor) or a != b:
            return False
    return True


def _tensor_bytes(leaves) -> int:
    return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))


class OutputCache:
    """Outputs of finished components (e.g. the vision tower while the LLM is calibrated), reused.

    Units are calibrated in forward order, and each pass re-runs the model from its inputs. A child
    of an ancestor of the unit being calibrated that holds a Linear but none of the unit's (the
    vision tower, the Q-Former, a projector) returns, for the same batch, its stored output when its
    parameters have not changed since (tensor version counters: every quantization write bumps them)
    and its inputs are equal to the stored ones (same tensor, or torch.equal). The values are what
    running it would give, so the statistics are unchanged; only the time of re-running it is saved.
    Blocks of a stack (children of a ModuleList) are not candidates. Within ``budget_bytes`` only."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.entries: dict = {}  # (module id, batch id) -> (param versions, input leaves, output, output leaves)

    def clear(self) -> None:
        """Forget every stored output (when no later unit will re-run the components they came from)."""
        self.entries.clear()
        self.used = 0

    def _candidates(self, model, unit: Unit) -> list:
        if self.budget <= 0:
            return []
        if getattr(model, "hf_device_map", None):
            return []  # accelerate owns forward there
        names = {module: name for name, module in model.named_modules()}
        exit_name = names.get(unit.exit_module)
        if exit_name is None:
            return []
        targets = {t.module for t in unit.targets}
        parts = exit_name.split(".") if exit_name else []
        ancestors = [".".join(parts[:k]) for k in range(len(parts))]
        modules = dict(model.named_modules())
        chosen = []
        for path in ancestors:
            parent = modules[path] if path else model
            if isinstance(parent, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                continue
            for child_name, child in parent.named_children():
                full = f"{path}.{child_name}" if path else child_name
                if full == exit_name or exit_name.startswith(full + "."):
                    continue
                inner = list(child.modules())
                if not any(isinstance(m, torch.nn.Linear) for m in inner) or any(m in targets for m in inner):
                    continue
                if "forward" in child.__dict__:
                    continue
                chosen.append(child)
        return chosen

    def wrap(self, model, unit: Unit, state: dict) -> list:
        wrapped = []
        for module in self._candidates(model, unit):
            module.forward = self._cached_forward(module, module.forward, state)
            wrapped.append(module)
        return wrapped

    @staticmethod
    def unwrap(wrapped: list) -> None:
        for module in wrapped:
            del module.forward

    def _cached_forward(self, module, forward, state):
        params = list(module.parameters()) + list(module.buffers())

        def cached(*args, **kwargs):
            key = (id(module), state["phase"], state["batch_id"])
            versions = tuple(p._version for p in params)
            now: list = []
            comparable = _leaves((args, kwargs), now)
            entry = self.entries.get(key)
            if entry is not None and comparable and entry[0] == versions and _same_leaves(entry[1], now):
                output, output_leaves = entry[2], entry[3]
                if all(x._version == v for x, v in output_leaves):
                    self.hits += 1
                    # A fresh container each time: callers may reassign its fields (Qwen-VL's
                    # get_image_features replaces pooler_output by its split), which must not reach the store.
                    return copy.copy(output)
            if entry is not None:
                self.used -= entry[4]
                del self.entries[key]
            output = forward(*args, **kwargs)
            out_leaves: list = []
            if comparable and _leaves(output, out_leaves):
                size = _tensor_bytes(now) + _tensor_bytes(out_leaves)
                if self.used + size <= self.budget:
                    self.entries[key] = (
                        versions, [(x, x._version if isinstance(x, torch.Tensor) else None) for x in now],
                        copy.copy(output),
                        [(x, x._version) for x in out_leaves if isinstance(x, torch.Tensor)], size)
                    self.used += size
            return output

        return cached
