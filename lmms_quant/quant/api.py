"""The engine's one verb, `quantize`: the recipe decides per module, the method executes it, the report proves it.

`quantize` owns what surrounds a run: the calibration-leak check (always first, before any cache
lookup: a cache hit must not let a leaking source through), the weight cache (its key, what an entry
holds, load and store: `lmms_quant.weight_cache`) and the report. `run_quantization` is the run itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from torch.profiler import record_function

from .archs import Family, Unit, resolve, select
from .calib_data import check_not_evaluated, load_samples, make_batches
from .calibration import Calibrator
from .sequential import SequentialCalibrator
from .recipe import Recipe, method_module
from .records import Recorder
from .report import QuantReport, account
from .span_clock import SpanClock

log = logging.getLogger(__name__)


class QuantizationError(RuntimeError):
    """Quantization could not do what the recipe asked (e.g. no targeted layer received data)."""


# Environment variables that change which kernels run, or how many threads split a reduction: the
# last bits of every result, and at 2 bits sometimes a code (the demo pins them, `lmms_quant.demo`).
ARITHMETIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                  "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _library_versions() -> dict:
    """MKL and oneDNN as built into this torch (their kernels differ between versions)."""
    import re

    shown = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([0-9][0-9.]*)", shown)
    onednn = re.search(r"MKL-DNN v([0-9][0-9.]*)", shown)
    return {"mkl": mkl.group(1) if mkl else None, "onednn": onednn.group(1) if onednn else None}


def _environment(device) -> dict:
    """What the numbers were computed with: versions, and the arithmetic (threads, kernels, processor)."""
    import importlib.metadata
    import platform

    import transformers

    import lmms_quant
    from lmms_quant.cpu import ARITHMETIC_FLAGS, cpu_info

    cpu, flags = cpu_info()
    try:
        lmms_eval = importlib.metadata.version("lmms-eval")
    except importlib.metadata.PackageNotFoundError:
        lmms_eval = None
    return {"lmms_quant": getattr(lmms_quant, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__, "lmms_eval": lmms_eval, **_library_versions(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_flags": [f for f in ARITHMETIC_FLAGS if f in flags],
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "arithmetic_env": {k: os.environ[k] for k in ARITHMETIC_ENV if k in os.environ}}


def _model_info(model, arch) -> dict:
    return {"class": type(model).__name__, "family": arch.family.name,
            "name_or_path": getattr(model.config, "_name_or_path", None), "dtype": str(model.dtype)}


def _tied_names(model) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def quantize(model, processor, recipe: Recipe, *, evaluated=(), cache=None, device=None, keep_codes: bool = False,
             progress: bool = True, family: Family | None = None) -> QuantReport:
    """Quantize ``model`` in place as ``recipe`` says (simulated: weights stay floating point on the grid).

    ``evaluated``: [(dataset_path, dataset_name, split), ...] being scored; a calibration source equal
    to one of them is refused. ``cache``: a `WeightCache` or its directory; quantized weights are taken
    from it when an entry for (checkpoint, recipe, calibration data, dtype, version) exists, and stored
    there otherwise (``report.weight_cache`` says which). ``keep_codes`` keeps integer codes, scales and
    zeros in ``report.codes`` (packed export); it always quantizes (the cache holds no codes).
    ``family`` overrides the architecture table (tests, unusual models)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: got {type(recipe).__name__}; valid: a Recipe (Recipe.parse(...))")
    check_not_evaluated(recipe.calib.source, evaluated)

    def run() -> QuantReport:
        return run_quantization(model, processor, recipe, device=device, keep_codes=keep_codes, progress=progress,
                                family=family)

    if cache is None or recipe.is_noop or keep_codes:
        return run()
    from lmms_quant import weight_cache

    return weight_cache.quantize_through(cache, model, recipe, run)


def run_quantization(model, processor, recipe: Recipe, *, device=None, keep_codes: bool = False,
                     progress: bool = True, family: Family | None = None, driver: str | None = None) -> QuantReport:
    """One quantization run (no cache, no leak check: `quantize` does those).

    ``driver``: ``sequential`` (block inputs captured once per stack, each block run alone;
    `sequential`) or ``model`` (the model re-run up to every unit; `calibration.Calibrator`), both
    giving the same statistics [``LMMS_QUANT_CALIB_DRIVER``, else sequential]. ``report.timing``:
    seconds in calibration (forwards, capture) and in the method, which includes the report's
    calibration statistics (``report_stats_s``); on CUDA each step's span on the device's timeline
    (the host queues a unit's work ahead of the device and reads its statistics a unit later,
    `records`), so the steps add up to the run's device time; on the CPU the host's clock."""
    started = time.perf_counter()
    arch = resolve(model, family)
    environment = _environment(device or model.device)
    if recipe.is_noop:
        sizes = account(model, arch.component_of, {})
        return QuantReport(plan=recipe.to_model_args(), digest=recipe.digest(), model=_model_info(model, arch),
                           calibration=None, tensors=[], sizes=sizes, skipped=[], folds=[], notes=[],
                           timing={"total_s": time.perf_counter() - started}, environment=environment)

    units = select(arch, recipe, model)
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(device)
    method = method_module(recipe.method)
    needs_calibration = method.NEEDS_HESSIAN or method.NEEDS_INPUTS

    calib = recipe.calib
    n_holdout = calib.report_holdout
    batches_started = time.perf_counter()
    samples = load_samples(calib.source, calib.n + n_holdout, calib.seed)
    text_only = calib.text_only or any(s.image is None for s in samples)
    if text_only and not calib.text_only:  # a hub split is known to be text only once loaded
        calib = dataclasses.replace(calib, source=dataclasses.replace(calib.source, modality="text"))
    calib.check_components({u.site.component for u in units})
    style = arch.family.prompt_style
    calib_batches = (make_batches(processor, style, samples[:calib.n], calib.batch_size, calib.style)
                     if needs_calibration else [])
    holdout_batches = make_batches(processor, style, samples[calib.n:], calib.batch_size, calib.style)
    batches_s = time.perf_counter() - batches_started  # samples loaded and encoded, on the host

    from tqdm.auto import tqdm

    bar = tqdm(total=len(units) * (len(calib_batches) + len(holdout_batches)), desc=f"lmms-quant {recipe.method}",
               unit="batch", disable=not progress)
    driver = driver or os.environ.get("LMMS_QUANT_CALIB_DRIVER", "sequential")
    if driver == "sequential":
        calibrator = SequentialCalibrator(model, calib_batches, holdout_batches, units=units,
                                          need_calib=needs_calibration or hasattr(method, "module_calls"),
                                          seed=calib.seed, progress=bar)
    elif driver == "model":
        calibrator = Calibrator(model, calib_batches, holdout_batches, seed=calib.seed, progress=bar)
    else:
        raise ValueError(f"driver: got {driver!r}; valid: sequential, model")
    # method_s includes report_stats_s: the report's calibration errors (RTN reference included)
    # calibration_s = the forwards up to the units (capture) + the units' own passes + next inputs
    timing = {"calibration_s": 0.0, "calibration_next_inputs_s": 0.0, "method_s": 0.0, "report_stats_s": 0.0}
    skipped: list[dict] = []
    folds: list[dict] = []
    recorder = Recorder(recipe, _tied_names(model), timing, keep_codes)

    def quantize_unit(unit, stats) -> None:
        """The method on one unit; its statistics queued for the report, its weights written back."""
        if needs_calibration:
            unit = _drop_layers_without_data(unit, stats, skipped)
            if not unit.targets:
                return
        results, notes = method.quantize_unit(unit, stats, recipe.config)
        folds.extend(notes)
        with record_function("lmms_quant.record"):
            recorder.stage(unit, stats, results)

    # Each step's seconds: on CUDA its span on the device's timeline (events on the current stream, read
    # at the end), so that no step makes the host wait for the device; on the CPU the host's clock.
    steps = SpanClock(any(p.is_cuda for p in model.parameters()))
    # and the host's own seconds per step (no device wait): where they add up to the run's time, the
    # run is bound by the host's launches, not by the device
    host = SpanClock(False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for unit in units:
                bar.set_postfix_str(unit.name, refresh=False)
                calls = method.module_calls(unit) if hasattr(method, "module_calls") else ()
                # named spans for torch.profiler
                with record_function("lmms_quant.calibrate"), steps.span("calibration"), host.span("calibration"):
                    stats = calibrator.collect(unit, hessian=method.NEEDS_HESSIAN, inputs=method.NEEDS_INPUTS,
                                               calls=calls)
                with host.span("read_records"):
                    recorder.flush()  # the previous unit's statistics: its work is done by now, or nearly
                with record_function("lmms_quant.method"), steps.span("method"), host.span("method"):
                    quantize_unit(unit, stats)
                del stats
                with record_function("lmms_quant.calibrate_next_inputs"), steps.span("next_inputs"), host.span("next_inputs"):
                    calibrator.finished(unit)
            recorder.flush()
    finally:
        bar.close()
        model.train(was_training)
    seconds = steps.by_name()
    timing["calibration_next_inputs_s"] = seconds.get("next_inputs", 0.0)
    timing["calibration_s"] = seconds.get("calibration", 0.0) + timing["calibration_next_inputs_s"]
    timing["method_s"] = seconds.get("method", 0.0)
    timing["host_steps_s"] = host.by_name()
    records, grids, codes = recorder.records, recorder.grids, recorder.codes

    if not records:
        raise QuantizationError("no targeted layer was quantized: " + "; ".join(
            f"{s['name']}: {s['reason']}" for s in skipped))
    sizes = account(model, arch.component_of, grids)
    calibration = {"source": calib.source.spec, "samples": calib.n, "holdout_samples": n_holdout,
                   "batch_size": calib.batch_size, "seed": calib.seed, "prompt_style": style,
                   "calib_style": calib.style, "text_only": text_only, "used_for_quantization": needs_calibration}
    notes = [f"AWQ fold not applied: {d}" for u in units for d in u.site.dropped_folds] if recipe.method == "awq" else []
    report = QuantReport(plan=recipe.to_model_args(), digest=recipe.digest(), model=_model_info(model, arch),
                         calibration=calibration, tensors=records, sizes=sizes, skipped=skipped, folds=folds,
                         notes=notes, timing={"total_s": time.perf_counter() - started, "units": len(units),
                                              "batches_s": batches_s, **timing, "driver": driver,
                                              **_driver_counts(calibrator)},
                         environment=environment, codes=codes)
    log.info("%s", report.summary())
    return report


def _driver_counts(calibrator) -> dict:
    counts = {name: getattr(calibrator, name) for name in ("block_forwards", "capture_passes") if hasattr(calibrator, name)}
    if hasattr(calibrator, "capture_s"):
        counts["calibration_capture_s"] = calibrator.capture_s
    if getattr(calibrator, "not_replayable", None):
        counts["model_driver_stacks"] = dict(calibrator.not_replayable)
    return counts


def _drop_layers_without_data(unit: Unit, stats, skipped: list[dict]) -> Unit:
    flags = {}  # per statistics object (Linears sharing an input share one), read in one go
    for t in unit.targets:
        flags.setdefault(id(stats[t.name]), stats[t.name].data_flag())
    pending = [(key, flag) for key, flag in flags.items() if isinstance(flag, torch.Tensor)]
    if pending:
        device = pending[0][1].device
        flags.update(zip([key for key, _ in pending],
                         torch.stack([flag.to(device) for _, flag in pending]).tolist()))
    missing = [t for t in unit.targets if not flags[id(stats[t.name])]]
    if not missing:
        return unit
    for t in missing:
        reason = ("no calibration token reached it" if stats[t.name].n_calib == 0
                  else "its calibration inputs were all zero")
        log.warning("lmms-quant: %s left unquantized: %s", t.name, reason)
        skipped.append({"name": t.name, "component": t.site.component, "reason": reason})
    kept = [t for t in unit.targets if t not in missing]
    names = {t.name for t in kept}
    return dataclasses.replace(unit, targets=kept, folds=[f for f in unit.folds if all(n in names for n in f.linears)])


__all__ = ["QuantizationError", "quantize", "run_quantization"]
