"""``lmms-quant leaderboard RUNS_DIR``: one row per configuration, Δ vs FP16, Pareto and sensitivity.

Reads every finished configuration under RUNS_DIR — the run directories a sweep writes (only those
whose ``run.json`` says ``ok``; an interrupted one is never read) and plain ``lmms-quant eval
--output_path`` directories — and writes, into ``--out`` (default RUNS_DIR):

- ``leaderboard.md`` and ``leaderboard.csv``: per configuration the method, bits per component, bits
  per weight including scale/zero overhead, size, whether the quantization is simulated (fake-quant
  weights in the checkpoint's dtype) or packed, every metric, and Δ vs the FP16 baseline of the same
  model on the same documents with a paired bootstrap 95% confidence interval;
- ``leaderboard.html``: a single self-contained page (inline CSS, JS and SVG; works offline) with a
  sortable, filterable table, a metric-vs-bpw Pareto plot per task with the frontier marked, and a
  component × bits sensitivity heatmap.

Confidence intervals. lmms-eval logs, per document, the value each metric's ``process_results``
returned. For metrics aggregated by a mean (VQA accuracy, exact match) those values are the per-doc
scores, so the CI comes from resampling documents with replacement (paired: the same documents for
the configuration and its baseline, 2,000 resamples, fixed seed, percentile interval). A metric is
treated as a mean only when the mean of its logged values reproduces the reported score. Corpus
metrics (CIDEr, BLEU, METEOR, ROUGE-L, retrieval recall) log per-doc inputs, not scores: a
bootstrap would have to rerun the corpus scorer — pycocoevalcap's Java tokenizer and, for CIDEr, a
document-frequency table recomputed from each resample — 2,000 times per row, minutes to hours for a
full split. Their Δ is shown without a CI ("n/a").

The outputs carry no timestamps or absolute paths: the same finished configurations always give the
same files, whichever order or how many sweep invocations produced them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import html
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmms_quant.model_ids import model_class
from lmms_quant.sweep import CONFIG_FILE, RUN_FILE, completed_run, find_results_files

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Wrapper keys that place or batch the computation but do not change what is computed: a run on
# cuda:1 still compares with the baseline that ran on cuda:0.
PLACEMENT_KEYS = {"device", "device_map", "batch_size", "max_batch_size", "report_dir", "weight_cache"}
# The metric a task is plotted by, the first found (else the task's first metric).
PRIMARY_METRIC_ORDER = ("CIDEr", "exact_match", "accuracy", "acc", "R@1", "recall@1", "r_mean", "METEOR")
STORAGE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}
FP_BITS = 16  # the plan's "left in floating point"
COMPONENT_ORDER = ("vit", "connector", "llm", "other")


# --------------------------------------------------------------------------- reading runs


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]  # "exact_match" (filter none) or "exact_match,<filter>" -> value
    higher_is_better: dict[str, bool]
    n_effective: int | None
    n_original: int | None
    samples_path: Path | None


@dataclass
class ReportFacts:
    """What the leaderboard reads from a quantization report (absent for an FP16 run)."""

    bpw: float | None = None
    size_bytes: int | None = None
    quantized_params: int | None = None
    total_params: int | None = None
    component_bits: dict[str, Any] = field(default_factory=dict)  # component -> bits (int) or "mixed"
    packed: bool | None = None


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
        if self.report.bpw is not None:
            return self.report.bpw
        if self.is_baseline:  # no report: every weight at the storage dtype
            dtype = self.wrapper_args.get("dtype", "auto")
            if dtype == "auto":
                dtype = _checkpoint_dtype(self.pretrained)
            return float(STORAGE_BITS.get(dtype, FP_BITS))
        return None

    @property
    def kind(self) -> str:
        if self.is_baseline:
            return "baseline"
        if self.report.packed is None:
            return "unknown"
        return "packed" if self.report.packed else "simulated"


def _checkpoint_dtype(pretrained: str) -> str | None:
    """The dtype a local checkpoint is stored in (what dtype=auto loads), from its config.json."""
    try:
        config = json.loads((Path(pretrained) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


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


@functools.lru_cache(maxsize=None)
def _wrapper_keys(model: str) -> tuple[str, ...] | None:
    try:
        return tuple(model_class(model).wrapper_keys())
    except (KeyError, ImportError, AttributeError):
        return None


def _is_noop(plan_args: dict[str, str]) -> bool:
    try:
        from lmms_quant.quant.recipe import Recipe

        return bool(Recipe.parse(dict(plan_args)).is_noop)
    except (ImportError, ValueError):
        return plan_args.get("method", "fp16") == "fp16"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def report_facts(report: dict | None) -> ReportFacts:
    """Bits per weight, size, per-component bits and packing from a quantization report dict.

    The schema is lmms_quant.quant.report.QuantReport.to_dict(): ``total`` and ``components`` hold
    params / quantized_params / bits_per_weight (scale and zero-point overhead included) / size_bytes;
    ``tensors`` lists every quantized tensor with its component and bits. A component's bits are the
    ones its tensors were actually quantized to ("mixed" if several), FP_BITS (16, the plan's "left in
    floating point") if none was. ``quantize_model`` simulates quantization (weights stay floating
    point on the integer grid); a report of packed weights says so with ``"packed": true``.
    """
    if not report:
        return ReportFacts()
    total = report.get("total") or {}
    components = report.get("components") or {}
    tensor_bits: dict[str, set] = {}
    for record in report.get("tensors") or []:
        tensor_bits.setdefault(str(record.get("component")), set()).add(record.get("bits"))
    bits = {}
    for name in sorted(set(components) | set(tensor_bits), key=_component_order):
        found = tensor_bits.get(name)
        if found:
            bits[name] = next(iter(found)) if len(found) == 1 else "mixed"
        elif name != "other":  # parameters outside the components are never quantized: no column
            bits[name] = FP_BITS
    packed = report.get("packed")
    if packed is None and isinstance(report.get("storage"), str):
        packed = report["storage"] == "packed"
    return ReportFacts(
        bpw=_number(total.get("bits_per_weight")),
        size_bytes=total.get("size_bytes"),
        quantized_params=total.get("quantized_params"),
        total_params=total.get("params"),
        component_bits=bits,
        packed=bool(packed),
    )


def _component_order(name: str) -> tuple:
    return (COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER), name)


def _task_results(results: dict, results_path: Path) -> dict[str, TaskResult]:
    prefix = results_path.name[: -len("_results.json")]
    tasks = {}
    for task, values in sorted((results.get("results") or {}).items()):
        metrics = {}
        for key, value in values.items():
            name, _, flt = key.partition(",")
            if key == "alias" or "_stderr" in name or _number(value) is None:
                continue
            metrics[name if flt in ("", "none") else key] = float(value)
        if not metrics:
            continue
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
    keys = _wrapper_keys(model)
    if keys is None:  # not an lmms-quant model: everything is the model's own argument
        wrapper_args, plan_args = dict(model_args), {}
    else:
        wrapper_args = {k: v for k, v in model_args.items() if k in keys}
        plan_args = {k: v for k, v in model_args.items() if k not in keys}
    if record is not None:
        run_id, label, is_baseline = record["run_id"], record["label"], bool(record["is_baseline"])
        digest = record.get("plan_digest")
    else:
        run_id = hashlib.sha256(str(results_path.relative_to(root)).encode()).hexdigest()[:16]
        is_baseline = _is_noop(plan_args) if keys is not None else False
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
    """Every finished configuration under ``root``, in a deterministic order."""
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
            try:
                data = json.loads((here / RUN_FILE).read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and data.get("status") == "failed":
                failed.append(data)
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


# --------------------------------------------------------------------------- Δ vs FP16


@dataclass
class Delta:
    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""  # why there is no CI (or no Δ)

    def text(self, digits: int = 4) -> str:
        if self.value is None:
            return "n/a"
        out = f"{self.value:+.{digits}f}"
        if self.low is not None and self.high is not None:
            out += f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        else:
            out += " (CI n/a)"
        return out


def read_samples(path: Path, metric: str) -> tuple[dict[int, float], dict[int, str]] | None:
    """doc_id -> the logged per-doc value of ``metric`` (None if not numeric), and doc_id -> doc_hash."""
    values, hashes = {}, {}
    name = metric.partition(",")[0]
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            sample = json.loads(line)
            doc_id = sample.get("doc_id")
            value = _number(sample.get(name))
            if value is None or doc_id in values:
                return None  # not a per-doc score, or several lines per doc (several filters)
            values[doc_id] = value
            hashes[doc_id] = sample.get("doc_hash")
    return values, hashes


def bootstrap_ci(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile CI of the mean of ``differences`` by resampling them with replacement."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // max(n, 1))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = differences[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def delta_vs_baseline(run: Run, baseline: Run, task: str, metric: str) -> Delta:
    mine, theirs = run.tasks[task], baseline.tasks[task]
    if metric not in theirs.metrics:
        return Delta(None, note="the baseline has no such metric")
    delta = mine.metrics[metric] - theirs.metrics[metric]
    if mine.samples_path is None or theirs.samples_path is None:
        return Delta(delta, note="no logged samples (run with --log_samples)")
    a, b = read_samples(mine.samples_path, metric), read_samples(theirs.samples_path, metric)
    if a is None or b is None:
        return Delta(delta, note="corpus-level metric: no per-document scores to resample")
    (values_a, hashes_a), (values_b, hashes_b) = a, b
    if set(values_a) != set(values_b) or any(hashes_a[d] != hashes_b[d] for d in values_a):
        return Delta(None, note="the baseline scored other documents")
    docs = sorted(values_a)
    x = np.array([values_a[d] for d in docs])
    y = np.array([values_b[d] for d in docs])
    tolerance = 1e-6 * max(1.0, abs(mine.metrics[metric]), abs(theirs.metrics[metric]))
    if abs(x.mean() - mine.metrics[metric]) > tolerance or abs(y.mean() - theirs.metrics[metric]) > tolerance:
        return Delta(delta, note="not a per-document mean: logged values do not average to the score")
    low, high = bootstrap_ci(x - y)
    return Delta(delta, low, high)


def find_baseline(run: Run, runs: Sequence[Run], task: str) -> Run | None:
    candidates = [r for r in runs if r.is_baseline and r.baseline_group == run.baseline_group and task in r.tasks
                  and r.tasks[task].n_effective == run.tasks[task].n_effective]
    return min(candidates, key=lambda r: r.run_id) if candidates else None


# --------------------------------------------------------------------------- the table


@dataclass
class Column:
    key: str
    title: str
    numeric: bool


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]  # key -> raw value (numbers stay numbers; None is empty)
    display: list[dict[str, str]]  # key -> formatted text
    notes: list[str]


def _fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def _fmt_size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def metric_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    seen = {}
    for run in runs:
        for task, result in run.tasks.items():
            for metric in result.metrics:
                seen[(task, metric)] = None
    return sorted(seen)


def component_names(runs: Sequence[Run]) -> list[str]:
    names = {name for run in runs for name in run.report.component_bits}
    return sorted(names, key=_component_order)


def build_table(collection: Collection) -> Table:
    runs = collection.runs
    metrics = metric_columns(runs)
    components = component_names(runs)
    columns = [Column("id", "id", False), Column("model", "model", False), Column("label", "configuration", False),
               Column("method", "method", False), Column("kind", "kind", False)]
    columns += [Column(f"bits:{c}", f"bits {c}", True) for c in components]
    columns += [Column("bpw", "bpw (incl. overhead)", True), Column("size", "size (bytes)", True),
                Column("quantized_params", "quantized params", True), Column("docs", "docs", False)]
    for task, metric in metrics:
        columns.append(Column(f"m:{task}:{metric}", f"{task} {metric}", True))
        columns.append(Column(f"d:{task}:{metric}", f"Δ {task} {metric}", True))
    rows, display = [], []
    notes: dict[str, None] = {}
    for run in runs:
        row: dict[str, Any] = {
            "id": run.run_id, "model": Path(run.pretrained).name or run.pretrained, "label": run.label,
            "method": run.method, "kind": run.kind, "bpw": run.bpw, "size": run.report.size_bytes,
            "quantized_params": run.report.quantized_params,
        }
        shown = {k: "" if v is None else str(v) for k, v in row.items()}
        shown["bpw"] = _fmt_number(run.bpw, 3) if run.bpw is not None else ""
        shown["size"] = _fmt_size(run.report.size_bytes)
        for name in components:
            bits = run.report.component_bits.get(name)
            row[f"bits:{name}"] = bits if isinstance(bits, (int, float)) else None
            shown[f"bits:{name}"] = "" if bits is None else "fp" if bits == FP_BITS else str(bits)
        limited = [f"{t}: {r.n_effective}/{r.n_original}" for t, r in sorted(run.tasks.items())
                   if r.n_effective is not None and r.n_original is not None and r.n_effective < r.n_original]
        row["docs"] = "; ".join(limited) or "all"
        shown["docs"] = row["docs"]
        if limited:
            notes["Rows whose docs column is not 'all' ran with --limit: smoke runs, not comparable with "
                  "full-split scores (CIDEr's document frequencies in particular depend on the set)."] = None
        for task, metric in metrics:
            key = f"{task}:{metric}"
            result = run.tasks.get(task)
            value = result.metrics.get(metric) if result else None
            row[f"m:{key}"] = value
            shown[f"m:{key}"] = _fmt_number(value)
            if value is None or run.is_baseline:
                row[f"d:{key}"] = None
                shown[f"d:{key}"] = "" if value is None else "baseline"
                continue
            baseline = find_baseline(run, runs, task)
            delta = delta_vs_baseline(run, baseline, task, metric) if baseline else Delta(
                None, note="no FP16 baseline of this model on the same documents")
            row[f"d:{key}"] = delta.value
            row[f"d:{key}:ci_low"], row[f"d:{key}:ci_high"] = delta.low, delta.high
            shown[f"d:{key}"] = delta.text()
            if delta.note:
                notes[f"{task} {metric}: {delta.note}."] = None
        rows.append(row)
        display.append(shown)
    notes_list = [f"Δ is the score minus the FP16 baseline's on the same documents; [low, high] is a paired "
                  f"bootstrap {CONFIDENCE:.0%} interval ({BOOTSTRAP_RESAMPLES} resamples of documents)."]
    notes_list += [f"Rows: {len(runs)} configurations. kind: simulated = fake-quantized weights stored in the "
                   "checkpoint dtype; packed = integer weights with scales. bits fp (16 in the CSV): the "
                   "component was left in floating point. bpw counts every parameter, quantized ones with "
                   "their scale and zero-point overhead, the rest at their stored dtype."]
    notes_list += list(notes)
    if collection.failed:
        notes_list.append("Failed configurations (not in the table; rerun the sweep to retry): "
                          + "; ".join(f"{d.get('label')} [{d.get('run_id')}]: {d.get('error')}" for d in collection.failed))
    if collection.incomplete:
        notes_list.append(f"{len(collection.incomplete)} interrupted or running configuration(s) ignored.")
    return Table(columns, rows, display, notes_list)


def to_markdown(table: Table) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# lmms-quant leaderboard", ""]
    lines.append("| " + " | ".join(cell(c.title) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|")
    for shown in table.display:
        lines.append("| " + " | ".join(cell(shown.get(c.key, "")) for c in table.columns) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    keys, titles = [], []
    for column in table.columns:
        keys.append(column.key)
        titles.append(column.title)
        if column.key.startswith("d:"):
            keys += [f"{column.key}:ci_low", f"{column.key}:ci_high"]
            titles += [f"{column.title} ci_low", f"{column.title} ci_high"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(titles)
    for row in table.rows:
        writer.writerow(["" if row.get(k) is None else (repr(row[k]) if isinstance(row[k], float) else row[k])
                         for k in keys])
    return out.getvalue()


# --------------------------------------------------------------------------- plots (SVG)

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def pareto_frontier(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both fewer bits and a better score."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    frontier, best = [], -math.inf
    for i in order:
        score = sign * points[i][1]
        if score > best:
            frontier.append(i)
            best = score
    return frontier


def pareto_svg(task: str, metric: str, runs: Sequence[Run], higher_is_better: bool, methods: list[str]) -> str:
    pts = [(r.bpw, r.tasks[task].metrics[metric], r) for r in runs
           if task in r.tasks and metric in r.tasks[task].metrics and r.bpw is not None]
    width, height, left, right, top, bottom = 560, 360, 64, 150, 30, 48
    if not pts:
        return f'<svg class="pareto" width="{width}" height="60"><text x="10" y="30">no points with a known bpw</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xpad = (x1 - x0) * 0.05 or 1.0
    ypad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.05)
    x0, x1, y0, y1 = x0 - xpad, x1 + xpad, y0 - ypad, y1 + ypad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    frontier = pareto_frontier([(p[0], p[1]) for p in pts], higher_is_better)
    parts = [f'<svg class="pareto" data-task="{html.escape(task)}" data-metric="{html.escape(metric)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="18" class="title">{html.escape(task)}: {html.escape(metric)} vs bpw</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#888"/>']
    for tick in _nice_ticks(x0, x1):
        parts.append(f'<line x1="{sx(tick):.1f}" x2="{sx(tick):.1f}" y1="{top}" y2="{top + ph}" stroke="#e3e3e3"/>'
                     f'<text x="{sx(tick):.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">{tick:g}</text>')
    for tick in _nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end" class="tick">{tick:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">bits per weight (incl. overhead)</text>')
    parts.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(metric)}</text>')
    line = sorted((pts[i][0], pts[i][1]) for i in frontier)
    parts.append('<polyline class="frontier" fill="none" stroke="#333" stroke-width="1.5" stroke-dasharray="5 3" '
                 f'points="{" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)}"/>')
    for i, (x, y, run) in enumerate(pts):
        color = PALETTE[methods.index(run.method) % len(PALETTE)] if run.method in methods else "#000"
        on = i in frontier
        parts.append(f'<circle class="point{" on-frontier" if on else ""}" data-id="{run.run_id}" cx="{sx(x):.1f}" '
                     f'cy="{sy(y):.1f}" r="{6 if on else 4.5}" fill="{color}" stroke="{"#000" if on else "none"}" '
                     f'stroke-width="1.5"><title>{html.escape(run.label)}: bpw {x:.3f}, {html.escape(metric)} '
                     f'{y:.4f}{" (Pareto frontier)" if on else ""}</title></circle>')
    for i, method in enumerate(methods):
        ly = top + 12 + 18 * i
        parts.append(f'<circle cx="{left + pw + 18}" cy="{ly}" r="5" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{left + pw + 28}" y="{ly + 4}">{html.escape(method)}</text>')
    ly = top + 12 + 18 * len(methods)
    parts.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 26}" y1="{ly}" y2="{ly}" stroke="#333" '
                 f'stroke-dasharray="5 3"/><text x="{left + pw + 28}" y="{ly + 4}">frontier</text>')
    parts.append("</svg>")
    return "".join(parts)


def _diverging(value: float, scale: float) -> str:
    """Red for a loss, blue for a gain, white for none (value / scale in [-1, 1])."""
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if t < 0:
        r, g, b = 255, int(255 * (1 + t * 0.8)), int(255 * (1 + t * 0.8))
    else:
        r, g, b = int(255 * (1 - t * 0.8)), int(255 * (1 - t * 0.5)), 255
    return f"#{r:02x}{g:02x}{b:02x}"


def sensitivity_cells(runs: Sequence[Run], task: str, metric: str, method: str):
    """(component, bits) -> (mean Δ, n configurations, mode).

    Preferred: configurations that quantize one component only (the others at full precision), which
    isolate the component's sensitivity. When a grid has none of those, the mean Δ over every
    configuration with that component at that bit width (a main effect) is shown instead.
    """
    deltas = []
    for run in runs:
        if run.is_baseline or run.method != method or task not in run.tasks or metric not in run.tasks[task].metrics:
            continue
        baseline = find_baseline(run, runs, task)
        if baseline is None or metric not in baseline.tasks[task].metrics:
            continue
        quantized = {c: b for c, b in run.report.component_bits.items() if isinstance(b, (int, float)) and b < 16}
        deltas.append((quantized, run.tasks[task].metrics[metric] - baseline.tasks[task].metrics[metric]))
    isolated = [(q, d) for q, d in deltas if len(q) == 1]
    mode = "one component quantized, others full precision" if isolated else "mean over configurations (main effect)"
    cells: dict[tuple[str, Any], list[float]] = {}
    for quantized, delta in (isolated or deltas):
        for component, bits in quantized.items():
            cells.setdefault((component, bits), []).append(delta)
    return {k: (sum(v) / len(v), len(v)) for k, v in cells.items()}, mode


def heatmap_svg(task: str, metric: str, method: str, runs: Sequence[Run], higher_is_better: bool) -> str | None:
    cells, mode = sensitivity_cells(runs, task, metric, method)
    if not cells:
        return None
    components = sorted({c for c, _ in cells})
    bits = sorted({b for _, b in cells})
    cw, ch, left, top = 64, 34, 110, 48
    title = f"{task} {metric}, {method}: Δ vs FP16"
    width = max(left + cw * len(bits) + 20, 7 * max(len(title), len(mode)) + 12)
    height = top + ch * len(components) + 16
    scale = max(abs(v) for v, _ in cells.values()) or 1.0
    parts = [f'<svg class="heatmap" data-task="{html.escape(task)}" data-method="{html.escape(method)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="4" y="16" class="title">{html.escape(title)}</text>'
             f'<text x="4" y="32" class="tick">{html.escape(mode)}</text>']
    for j, b in enumerate(bits):
        parts.append(f'<text x="{left + cw * j + cw / 2}" y="{top - 4}" text-anchor="middle">{b:g} bits</text>')
    for i, component in enumerate(components):
        parts.append(f'<text x="{left - 6}" y="{top + ch * i + ch / 2 + 4}" text-anchor="end">{html.escape(component)}</text>')
        for j, b in enumerate(bits):
            if (component, b) not in cells:
                parts.append(f'<rect x="{left + cw * j}" y="{top + ch * i}" width="{cw}" height="{ch}" fill="#eee" stroke="#fff"/>')
                continue
            value, n = cells[(component, b)]
            good = value if higher_is_better else -value
            ink = "#fff" if abs(good) > 0.6 * scale else "#222"
            parts.append(f'<rect class="cell" x="{left + cw * j}" y="{top + ch * i}" width="{cw}" height="{ch}" '
                         f'fill="{_diverging(good, scale)}" stroke="#fff"><title>{html.escape(component)} at {b:g} bits: '
                         f'Δ {value:+.4f} (n={n})</title></rect>'
                         f'<text x="{left + cw * j + cw / 2}" y="{top + ch * i + ch / 2 + 4}" text-anchor="middle" '
                         f'fill="{ink}">{value:+.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def primary_metric(runs: Sequence[Run], task: str) -> str | None:
    """The metric a task is plotted by: the first of PRIMARY_METRIC_ORDER it reports, else its first."""
    metrics = list(dict.fromkeys(m for r in runs if task in r.tasks for m in r.tasks[task].metrics))
    for preferred in PRIMARY_METRIC_ORDER:
        for metric in metrics:
            name = metric.partition(",")[0]
            if name == preferred or name.endswith("_" + preferred):  # coco_CIDEr, flickr_CIDEr
                return metric
    return metrics[0] if metrics else None


# --------------------------------------------------------------------------- the page

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline td { background: #fff8dc; }
#filter { margin: 8px 0; padding: 4px; width: 320px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
svg text { font: 11px system-ui, sans-serif; }
svg text.title { font-weight: bold; font-size: 12px; }
svg text.tick { fill: #555; }
.notes li { color: #555; }
.scroll { overflow-x: auto; max-height: 70vh; }
"""

# Sorting is done by a header's click handler only; `?sort=<column key>&desc=1` on load clicks the
# header (twice for descending), so a link — or a test — exercises exactly what a click does.
_JS = r"""
(function () {
  var table = document.getElementById('leaderboard');
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute('data-value');
    if (numeric) { var v = parseFloat(raw); return isNaN(v) ? null : v; }
    return (raw === null ? cell.textContent : raw).toLowerCase();
  }
  function sortBy(th) {
    var index = headers.indexOf(th);
    var numeric = th.getAttribute('data-type') === 'num';
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row, i) { row._order = i; });
    rows.sort(function (a, b) {
      var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
      if (x === y) return a._order - b._order;
      if (x === null || x === '') return 1;   // empty cells last, either direction
      if (y === null || y === '') return -1;
      var c = x < y ? -1 : 1;
      return ascending ? c : -c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  headers.forEach(function (th) { th.addEventListener('click', function () { sortBy(th); }); });
  var filter = document.getElementById('filter');
  function applyFilter() {
    var terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var text = row.textContent.toLowerCase();
      var keep = terms.every(function (t) { return text.indexOf(t) >= 0; });
      row.hidden = !keep;
      if (keep) shown += 1;
    });
    document.getElementById('shown').textContent = shown;
  }
  filter.addEventListener('input', applyFilter);
  var params = new URLSearchParams(window.location.search);
  if (params.get('filter')) { filter.value = params.get('filter'); }
  applyFilter();
  var key = params.get('sort');
  if (key) {
    var th = headers.filter(function (h) { return h.getAttribute('data-key') === key; })[0];
    if (th) { th.click(); if (params.get('desc') === '1') th.click(); }
  }
  document.body.setAttribute('data-ready', '1');
})();
"""


def to_html(table: Table, collection: Collection) -> str:
    runs = collection.runs
    methods = sorted({r.method for r in runs})
    head = "".join(f'<th data-key="{html.escape(c.key)}" data-type="{"num" if c.numeric else "text"}">'
                   f'{html.escape(c.title)}</th>' for c in table.columns)
    body = []
    for row, shown in zip(table.rows, table.display):
        cells = []
        for c in table.columns:
            value = row.get(c.key)
            data = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
            cells.append(f'<td{" class=num" if c.numeric else ""} data-value="{html.escape(data)}">'
                         f'{html.escape(shown.get(c.key, ""))}</td>')
        cls = ' class="baseline"' if row.get("kind") == "baseline" else ""
        body.append(f'<tr data-id="{html.escape(row["id"])}"{cls}>{"".join(cells)}</tr>')
    tasks = sorted({t for r in runs for t in r.tasks})
    plots, heatmaps = [], []
    for task in tasks:
        metric = primary_metric(runs, task)
        if metric is None:
            continue
        hib = next((r.tasks[task].higher_is_better.get(metric, True) for r in runs if task in r.tasks), True)
        plots.append(pareto_svg(task, metric, runs, hib, methods))
        for method in methods:
            if method == "fp16":
                continue
            svg = heatmap_svg(task, metric, method, runs, hib)
            if svg:
                heatmaps.append(svg)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmms-quant leaderboard</title>
<style>{_CSS}</style></head>
<body>
<h1>lmms-quant leaderboard</h1>
<p><input id="filter" type="search" placeholder="filter rows: words that must all appear">
<span><span id="shown">{len(table.rows)}</span> of {len(table.rows)} configurations shown; click a header to sort.</span></p>
<div class="scroll"><table id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table></div>
<ul class="notes">{notes}</ul>
<h2>Score vs bits per weight (Pareto frontier dashed)</h2>
<div class="plots" id="pareto">{"".join(plots) or "<p>no tasks</p>"}</div>
<h2>Sensitivity: component × bits</h2>
<div class="plots" id="sensitivity">{"".join(heatmaps) or "<p>no quantized configurations with per-component bits</p>"}</div>
<script>{_JS}</script>
</body></html>
"""


# --------------------------------------------------------------------------- command line


def write_leaderboard(runs_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """Write leaderboard.{md,csv,html}; return (name -> path, the table)."""
    collection = collect_runs(runs_dir)
    table = build_table(collection)
    out = Path(out_dir or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in (("leaderboard.md", to_markdown(table)), ("leaderboard.csv", to_csv(table)),
                       ("leaderboard.html", to_html(table, collection))):
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written[name] = path
    return written, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmms-quant leaderboard",
        description="Tabulate finished lmms-quant runs: Markdown, CSV and a self-contained HTML page.")
    parser.add_argument("runs_dir", help="a sweep's output directory, or any directory of lmms-quant eval outputs")
    parser.add_argument("--out", default=None, help="where to write leaderboard.{md,csv,html} (default RUNS_DIR)")
    args = parser.parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"lmms-quant leaderboard: {args.runs_dir!r} is not a directory", file=sys.stderr)
        return 2
    written, table = write_leaderboard(args.runs_dir, args.out)
    if not table.rows:
        print(f"lmms-quant leaderboard: no finished runs under {args.runs_dir}", file=sys.stderr)
        return 1
    print(f"{len(table.rows)} configurations")
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
