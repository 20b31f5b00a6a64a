"""The report's tensor records: a unit's statistics computed on the device when it is done, read one unit later.

On a GPU the host queues each unit's work ahead of the device. A unit's statistics (weight and
output errors, level counts, the method's calibration errors, its checks and its spans' seconds)
read the moment the method returns would make the host wait for the unit's last kernel before it
queues the next block's forwards, and the device would then idle while the host launched them
(host-bound: ~0.75 ms of host time for an eager block forward the GPU runs in ~0.1 ms, two per
batch and block). So `Recorder.stage` queues the statistics and a copy to pinned host memory
(`span_clock.HostRead`), and writes the unit's weights into the model; `Recorder.flush`, called
once the next unit's calibration is queued, reads them, raises a method's failed `DeviceCheck` (a
Hessian that did not factor: the run fails one unit later, before any result is kept) and makes the
records. On the CPU the same steps run, with nothing to wait for.
"""

from __future__ import annotations

import math

import torch

from .archs import stored_weight
from .quantizer import max_levels_tensor, output_error_terms
from .report import TensorRecord
from .span_clock import HostRead, resolved

_NAN = float("nan")


class Recorder:
    """Records of every unit of a run, with what the report sums from them (``timing``) and, for
    ``keep_codes``, each Linear's codes on the CPU."""

    def __init__(self, recipe, tied: dict[int, list[str]], timing: dict, keep_codes: bool):
        self.recipe, self.tied, self.timing, self.keep_codes = recipe, tied, timing, keep_codes
        self.records: list[TensorRecord] = []
        self.grids: dict[int, tuple] = {}  # stored weight -> (grid, shape), for the size accounting
        self.codes: dict = {}
        self._pending: list[tuple] = []

    def stage(self, unit, stats, results) -> None:
        """Queue the unit's statistics against the original weights, then write the results into the
        modules. Every record's statistics first, then every write: the modules still hold their
        original weights (methods leave them as they found them), so no copy of a unit's weights is
        made to compare against, and a weight tied between two targets is the original for both."""
        measured, checks, held = [], {}, []
        for t in unit.targets:
            result = results[t.name]
            original = t.module.weight.detach().float()
            # what the module will hold: the result rounded to the model's dtype, in its coordinates
            effective = result.effective_weight(result.qweight.weight.to(t.module.weight.dtype))
            holdout = stats[t.name].holdout
            output_terms = (torch.zeros(2, dtype=torch.float64, device=original.device) if holdout is None
                            else output_error_terms(holdout, original, effective))
            levels = max_levels_tensor(result.qweight.codes, result.qweight.grid).float()
            calib = [_as_tensor(v, original.device) for v in (result.calib_error, result.rtn_calib_error)]
            measured.append(torch.cat([torch.stack([(original - effective).norm(), original.norm(), levels]).double(),
                                       output_terms, torch.stack(calib)]))
            if result.check is not None:
                checks.setdefault(id(result.check), result.check)
            held.append((t, result.info, result.calib_error is None, result.rtn_calib_error is None,
                         None if holdout is None else int(holdout.shape[0])))
            if self.keep_codes:
                self.codes[t.name] = result.qweight.to_cpu()
            del original, effective
        # (a unit spread over several devices by accelerate gathers its statistics on the first one)
        device = measured[0].device if measured else None
        read = HostRead([torch.stack([m.to(device) for m in measured])] +
                        [c.flags.to(device) for c in checks.values()] if measured else [])
        self._pending.append((held, list(checks.values()), read))
        for t in unit.targets:
            t.module.weight.copy_(results[t.name].qweight.weight.to(t.module.weight.dtype))

    def flush(self) -> None:
        """Read every staged unit (waiting only for its own statistics) and make its records."""
        pending, self._pending = self._pending, []
        for held, checks, read in pending:
            values = read.values()
            if not values:
                continue
            for check, flags in zip(checks, values[1:]):
                flags = [bool(f) for f in flags]
                if not all(flags):
                    raise check.fail(flags)
            per_target = [values[0][k:k + 7] for k in range(0, len(values[0]), 7)]
            for (t, info, no_calib, no_rtn, holdout_tokens), row in zip(held, per_target):
                self._record(t, info, row, no_calib, no_rtn, holdout_tokens)

    def _record(self, t, info, row, no_calib: bool, no_rtn: bool, holdout_tokens) -> None:
        delta_norm, norm, levels, out_num, out_den, calib_error, rtn_calib_error = row
        shape = tuple(t.module.weight.shape)
        output_error = None if holdout_tokens is None else (
            math.sqrt(out_num / out_den) if out_den > 0 else _NAN)
        # Timings go to the report's totals, not into a tensor's record: two runs of one recipe give
        # identical tensor records.
        details = dict(info or {})
        self.timing["report_stats_s"] += resolved(details.pop("report_stats_s", 0.0))
        for phase, seconds in resolved(details.pop("phase_s", {})).items():  # a method's own phases
            phases = self.timing.setdefault("method_phases_s", {})
            phases[phase] = phases.get(phase, 0.0) + seconds
        recipe = self.recipe
        self.records.append(TensorRecord(
            name=t.name, component=t.site.component, stack=t.site.stack, block=t.site.block,
            role=t.site.role, method=recipe.method, bits=t.grid.bits, granularity=t.grid.granularity,
            group_size=t.grid.group_size, sym=t.grid.sym, shape=shape,
            n_groups=t.grid.n_groups(shape[1]), max_levels=int(levels),
            weight_error=delta_norm / norm if norm > 0 else _NAN,
            output_error=output_error,
            output_error_calib=None if no_calib else calib_error,
            rtn_output_error_calib=None if no_rtn else rtn_calib_error,
            feeds_output=t.site.feeds_output,
            tied_to=[n for n in self.tied.get(id(stored_weight(t.module)), []) if n not in (t.name, f"{t.name}.weight")],
            holdout_tokens=holdout_tokens or 0,
            details=details,
        ))
        self.grids[id(stored_weight(t.module))] = (t.grid, shape)


def _as_tensor(value, device) -> torch.Tensor:
    """A record's float (None: NaN, told apart by the caller) or 0-dim device tensor, as float64 on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64).reshape(())
    # a fill kernel, not a copy from host memory (which would wait for the device)
    return torch.full((), _NAN if value is None else float(value), dtype=torch.float64, device=device)
