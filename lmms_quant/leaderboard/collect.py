"""Finding finished runs under a directory and reading their results, samples logs and reports.

Two layouts are read: the run directories a sweep writes (only those whose ``run.json`` says ``ok``;
an interrupted one is never read) and plain ``lmms-quant eval --output_path`` directories
(``<out>/<model_name_sanitized>/<date>_results.json`` with ``*_samples_<task>.jsonl`` beside it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_quant.model_ids import MODEL_CLASSES
from lmms_quant.sweep import CONFIG_FILE, RUN_FILE, completed_run, find_results_files
from lmms_quant.sweep.rundir import failed_run

# Wrapper keys that place or batch the computation but do not change what is computed: a run on
# cuda:1 still compares with the baseline that ran on cuda:0.
PLACEMENT_KEYS = {"device", "device_map", "batch_size", "max_batch_size", "report_dir", "weight_cache"}
FP_BITS = 16  # the plan's "left in floating point", and what a report's bits per weight are measured against
COMPONENT_ORDER = ("vit", "connector", "llm", "other")
# Metrics the leaderboard derives from reported ones: name -> (the reported metrics it averages, what it is).
DERIVED_METRICS = {
    "r1_mean": (("i2t_r1", "t2i_r1"), "mean of image→text and text→image R@1"),
}


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # "exact_match" (filter none) or "exact_match,<filter>" -> value
    higher_is_better: dict[str, bool]
    n_effective: int | None
    n_original: int | None
    samples_path: Path | None


@dataclass
class ExportFacts:
    """A packed export of the quantized weights, as the report's ``export`` block states it."""

    format: str
    dir: str
    file_bytes: int | None
    loaded_memory_bytes: int | None
    device: str | None


@dataclass
class ReportFacts:
    """What the leaderboard reads from a quantization report (absent for an FP16 run)."""

    bpw: float | None = None
    size_bytes: int | None = None
    quantized_params: int | None = None
    total_params: int | None = None
    component_bits: dict[str, Any] = field(default_factory=dict)  # component -> bits (int) or "mixed"
    found: bool = False
    export: ExportFacts | None = None

    @property
    def packed(self) -> bool:
        return self.export is not None


@dataclass
class Run:
    run_id: str
    label: str
    model: str
    model_args: dict[str, str]
    wrapper_args: dict[str, str]
    plan_args: dict[str, str]
    is_baseline: bool
    source: str  # directory relative to RUNS_DIR
    tasks: dict[str, TaskResult]
    report: ReportFacts

    @property
    def method(self) -> str:
        return self.plan_args.get("method", "fp16" if self.is_baseline else "?")

    @property
    def pretrained(self) -> str:
        return self.wrapper_args.get("pretrained", self.model_args.get("pretrained", "?"))

    @property
    def baseline_group(self) -> tuple:
        kept = sorted((k, v) for k, v in self.wrapper_args.items()
                      if k not in PLACEMENT_KEYS and k != "lmms_quant_version")
        return (self.model, tuple(kept))

    @property
    def bpw(self) -> float | None:
        """The report's bits per weight; the FP16 baseline is the 16 bits the reports measure against."""
        if self.report.bpw is not None:
            return self.report.bpw
        return float(FP_BITS) if self.is_baseline else None

    @property
    def kind(self) -> str:
        if self.is_baseline:
            return "baseline"
        if not self.report.found:
            return "unknown"
        return "packed" if self.report.packed else "simulated"


def parse_model_args(text: str) -> dict[str, str]:
    """lmms-eval's ``k=v,k=v`` model_args string, values kept as strings."""
    args = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"model_args: {part!r} is not key=value (in {text!r})")
        args[key.strip()] = value.strip()
    return args


def split_model_args(model: str, model_args: dict[str, str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """(wrapper arguments, recipe arguments) of an lmms-quant model's model_args, split by the engine's
    recipe keys as the sweep splits them (every wrapper, `quant` included); None for another model."""
    if model not in MODEL_CLASSES:
        return None
    from lmms_quant.quant.recipe import recipe_keys

    keys = set(recipe_keys())
    return ({k: v for k, v in model_args.items() if k not in keys},
            {k: v for k, v in model_args.items() if k in keys})


def is_noop_plan(plan_args: dict[str, str]) -> bool:
    """Whether a plan quantizes nothing — the one place the leaderboard asks the engine's plan parser."""
    try:
        from lmms_quant.quant.recipe import Recipe

        return bool(Recipe.parse(dict(plan_args)).is_noop)
    except (ImportError, ValueError):
        return plan_args.get("method", "fp16") == "fp16"


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def component_order(name: str) -> tuple:
    return (COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER), name)


def _export_facts(export: Any) -> ExportFacts | None:
    if not isinstance(export, dict) or not export.get("format"):
        return None
    as_int = lambda v: int(v) if number(v) is not None else None  # noqa: E731
    return ExportFacts(format=str(export["format"]), dir=str(export.get("dir", "")),
                       file_bytes=as_int(export.get("file_bytes")),
                       loaded_memory_bytes=as_int(export.get("loaded_memory_bytes")),
                       device=None if export.get("device") is None else str(export["device"]))


def report_facts(report: dict | None) -> ReportFacts:
    """Bits per weight, size, per-component bits and packing from a quantization report dict.

    bpw and size are the report's own (bits per weight against a 16-bit baseline, scale and
    zero-point overhead included); nothing is recomputed here. A component's bits are the ones its
    tensors were actually quantized to ("mixed" if several), FP_BITS if none was. A report with an
    ``export`` block ({"format", "dir", "file_bytes", "loaded_memory_bytes", "device"}) describes
    packed weights written to disk; without it the quantization was simulated (weights stay floating
    point on the integer grid).
    """
    if not report:
        return ReportFacts()
    total, components = report.get("total") or {}, report.get("components") or {}
    tensor_bits: dict[str, set] = {}
    for record in report.get("tensors") or []:
        tensor_bits.setdefault(str(record.get("component")), set()).add(record.get("bits"))
    bits = {}
    for name in sorted(set(components) | set(tensor_bits), key=component_order):
        found = tensor_bits.get(name)
        if found:
            bits[name] = next(iter(found)) if len(found) == 1 else "mixed"
        elif name != "other":  # parameters outside the components are never quantized: no column
            bits[name] = FP_BITS
    return ReportFacts(
        bpw=number(total.get("bits_per_weight")),
        size_bytes=total.get("size_bytes"),
        quantized_params=total.get("quantized_params"),
        total_params=total.get("params"),
        component_bits=bits,
        found=True,
        export=_export_facts(report.get("export")),
    )


def _task_results(results: dict, results_path: Path) -> dict[str, TaskResult]:
    prefix = results_path.name[: -len("_results.json")]
    tasks = {}
    for task, values in sorted((results.get("results") or {}).items()):
        metrics = {}
        for key, value in values.items():
            name, _, flt = key.partition(",")
            if key == "alias" or "_stderr" in name or number(value) is None:
                continue
            metrics[name if flt in ("", "none") else key] = float(value)
        if not metrics:
            continue
        for derived, (parts, _) in DERIVED_METRICS.items():
            if derived not in metrics and all(p in metrics for p in parts):
                metrics[derived] = sum(metrics[p] for p in parts) / len(parts)
        hib = (results.get("higher_is_better") or {}).get(task) or {}
        n = (results.get("n-samples") or {}).get(task) or {}
        samples = results_path.parent / f"{prefix}_samples_{task}.jsonl"
        tasks[task] = TaskResult(
            task=task, metrics=metrics,
            higher_is_better={m: bool(hib.get(m.partition(",")[0], True)) for m in metrics},
            n_effective=n.get("effective"), n_original=n.get("original"),
            samples_path=samples if samples.is_file() else None,
        )
    return tasks


def _load_report(results_dir: Path, digest: str | None) -> dict | None:
    reports = sorted(results_dir.glob("quant_report_*.json"))
    if digest:
        reports = [p for p in reports if p.stem == f"quant_report_{digest}"] or reports
    if len(reports) != 1:
        return None
    try:
        return json.loads(reports[0].read_text())
    except ValueError:
        return None


def _run_from_results(results_path: Path, root: Path, source_dir: Path, record: dict | None) -> Run:
    results = json.loads(results_path.read_text())
    config = results.get("config") or {}
    model = str(config.get("model"))
    model_args = parse_model_args(config.get("model_args") or "")
    split = split_model_args(model, model_args)
    # not an lmms-quant model: everything is the model's own argument
    wrapper_args, plan_args = split if split is not None else (dict(model_args), {})
    if record is not None:
        run_id, label, is_baseline = record["run_id"], record["label"], bool(record["is_baseline"])
        digest = record.get("plan_digest")
    else:
        run_id = hashlib.sha256(str(results_path.relative_to(root)).encode()).hexdigest()[:16]
        is_baseline = is_noop_plan(plan_args) if split is not None else False
        label = " ".join(f"{k}={v}" for k, v in plan_args.items()) or model
        digest = None
    return Run(
        run_id=run_id, label=label, model=model, model_args=model_args, wrapper_args=wrapper_args,
        plan_args=plan_args, is_baseline=is_baseline, source=str(source_dir.relative_to(root)),
        tasks=_task_results(results, results_path),
        report=report_facts(_load_report(results_path.parent, digest)),
    )


@dataclass
class Collection:
    runs: list[Run]
    failed: list[dict]  # run.json records with status failed
    incomplete: list[str]  # sweep run directories without a finished run.json (interrupted or running)


def collect_runs(root: str | os.PathLike) -> Collection:
    """Every finished configuration under ``root``, in a deterministic order: grouped by model, the
    baseline first, then by method, and within a method by bits per weight, highest first."""
    root = Path(root).resolve()
    runs, failed, incomplete = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if RUN_FILE in filenames or CONFIG_FILE in filenames:  # a sweep's run directory
            dirnames[:] = []
            record = completed_run(here)
            if record is not None:
                runs.append(_run_from_results(here / record["results_file"], root, here, record))
                continue
            failure = failed_run(here)
            if failure is not None:
                failed.append(failure)
            else:
                incomplete.append(str(here.relative_to(root)))
            continue
        # a plain `lmms-quant eval --output_path` directory: <here>/<model_name_sanitized>/<date>_results.json
        results = find_results_files(here)
        for path in results:
            runs.append(_run_from_results(path, root, here, None))
        consumed = {p.parent.name for p in results} | {"submissions"}
        dirnames[:] = sorted(d for d in dirnames if d not in consumed)
    runs.sort(key=lambda r: (r.model, r.pretrained, not r.is_baseline, r.method,
                             -(r.bpw if r.bpw is not None else math.inf), r.label, r.run_id))
    failed.sort(key=lambda d: str(d.get("run_id")))
    return Collection(runs, failed, sorted(incomplete))


# --------------------------------------------------------------------------- samples logs


@dataclass
class SampleLog:
    """One lmms-eval ``*_samples_<task>.jsonl``: per doc (in doc_id order) its hash and logged values."""

    doc_ids: list
    doc_hashes: list
    lines: list[dict]
    duplicated: bool  # several lines per doc (several filters): no per-doc view

    def values_of(self, name: str) -> list:
        return [line.get(name) for line in self.lines]


# What lmms-eval logs per doc besides the metrics' values: not needed here, and large (the prompt).
_BOOKKEEPING_KEYS = ("target", "filtered_resps", "resps", "input", "input_media", "token_counts", "arguments", "doc")


def read_sample_log(path: Path) -> SampleLog:
    lines, seen, duplicated = [], set(), False
    with open(path) as handle:
        for text in handle:
            if not text.strip():
                continue
            sample = json.loads(text)
            for key in _BOOKKEEPING_KEYS:
                sample.pop(key, None)
            # the caption and retrieval tasks log one and the same dict under every metric: keep one copy
            kept: list = []
            for key, value in sample.items():
                if isinstance(value, dict):
                    sample[key] = next((k for k in kept if k == value), value)
                    kept.append(sample[key])
            if sample.get("doc_id") in seen:
                duplicated = True
            seen.add(sample.get("doc_id"))
            lines.append(sample)
    lines.sort(key=lambda s: (str(type(s.get("doc_id"))), s.get("doc_id")))
    return SampleLog([s.get("doc_id") for s in lines], [s.get("doc_hash") for s in lines], lines, duplicated)


def read_samples(path: Path, metric: str) -> tuple[dict[int, float], dict[int, str]] | None:
    """doc_id -> the logged per-doc value of ``metric``, and doc_id -> doc_hash; None when the logged
    values are not numbers (a corpus metric logs its scorer's inputs) or a doc has several lines."""
    log = read_sample_log(path)
    name = metric.partition(",")[0]
    values = [number(v) for v in log.values_of(name)]
    if log.duplicated or any(v is None for v in values):
        return None
    return dict(zip(log.doc_ids, values)), dict(zip(log.doc_ids, log.doc_hashes))
