"""The table model: one row per configuration; the compact view (one headline metric per task with
its Δ and interval) and the full one (every metric); Markdown and CSV.

leaderboard.md, the terminal table of the demo and the first view of the page show the compact
columns; leaderboard.csv holds every column with the interval bounds of every Δ.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmms_quant.leaderboard.bootstrap import BOOTSTRAP_RESAMPLES, CONFIDENCE
from lmms_quant.leaderboard.collect import DERIVED_METRICS, FP_BITS, Collection, Run, component_order
from lmms_quant.leaderboard.stats import Delta, IntervalContext, delta_vs_baseline, find_baseline

# The headline metric of a task, the first it reports (else its first): captions, VQA/GQA, retrieval.
HEADLINE_ORDER = ("CIDEr", "exact_match", "accuracy", "acc", "r1_mean", "R@1", "recall@1", "r_mean", "METEOR")
SIGNIFICANT_MARK = "*"


class HeadlineError(ValueError):
    """A --headline choice that names no evaluated task or none of its metrics."""


@dataclass
class Column:
    key: str
    title: str
    numeric: bool
    compact: bool = False  # in leaderboard.md, the demo's table and the page's first view


@dataclass
class Headline:
    task: str
    metric: str
    digits: int  # decimals the compact view shows


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict[str, Any]]  # key -> raw value (numbers stay numbers; None is empty)
    display: list[dict[str, str]]  # key -> formatted text, full precision
    notes: list[str]
    headlines: list[Headline] = field(default_factory=list)
    compact: list[dict[str, str]] = field(default_factory=list)  # compact column key -> text
    significant: list[set[str]] = field(default_factory=list)  # Δ keys whose interval excludes 0

    @property
    def compact_columns(self) -> list[Column]:
        return [c for c in self.columns if c.compact]


def _fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return str(value)


def fmt_size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def metric_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return sorted({(task, metric) for run in runs for task, result in run.tasks.items() for metric in result.metrics})


def component_names(runs: Sequence[Run]) -> list[str]:
    return sorted({name for run in runs for name in run.report.component_bits}, key=component_order)


def task_order(runs: Sequence[Run]) -> list[str]:
    """Tasks in the order their models' rows come; within a model captions, then VQA/GQA, then
    retrieval (by their default headline metric), then by name."""
    def kind(task: str) -> int:
        metric = default_headline(runs, task) or ""
        return next((i for i, m in enumerate(HEADLINE_ORDER) if _matches(metric, m)), len(HEADLINE_ORDER))

    order: dict[str, None] = {}
    for run in runs:
        for task in sorted(run.tasks, key=lambda t: (kind(t), t)):
            order.setdefault(task, None)
    return list(order)


def _task_metrics(runs: Sequence[Run], task: str) -> list[str]:
    return list(dict.fromkeys(m for r in runs if task in r.tasks for m in r.tasks[task].metrics))


def _matches(metric: str, wanted: str) -> bool:
    name = metric.partition(",")[0]
    return metric == wanted or name == wanted or name.endswith("_" + wanted)  # CIDEr -> coco_CIDEr


def default_headline(runs: Sequence[Run], task: str) -> str | None:
    metrics = _task_metrics(runs, task)
    for preferred in HEADLINE_ORDER:
        for metric in metrics:
            if _matches(metric, preferred):
                return metric
    return metrics[0] if metrics else None


def choose_headlines(runs: Sequence[Run], chosen: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(task, metric) per task: ``chosen`` (task -> metric, or a suffix such as CIDEr) else the default."""
    tasks = task_order(runs)
    chosen = dict(chosen or {})
    for task, wanted in chosen.items():
        if task not in tasks:
            raise HeadlineError(f"--headline: task {task!r} is not among the evaluated tasks; valid: {', '.join(tasks)}")
        metrics = _task_metrics(runs, task)
        found = [m for m in metrics if _matches(m, wanted)]
        exact = [m for m in found if m == wanted]
        if len(exact or found) != 1:
            raise HeadlineError(f"--headline {task}={wanted}: {'ambiguous' if found else 'no such metric'}; "
                                f"valid: {', '.join(metrics)}")
        chosen[task] = (exact or found)[0]
    picked = [(task, chosen.get(task) or default_headline(runs, task)) for task in tasks]
    return [(task, metric) for task, metric in picked if metric is not None]


def _digits(values: Sequence[float]) -> int:
    return 1 if values and max(abs(v) for v in values) >= 10 else 3  # R@K in percent vs 0-1 / 0-10 scores


def _compact_delta(delta: Delta | None, is_baseline: bool, digits: int) -> str:
    if is_baseline:
        return "baseline"
    if delta is None or delta.value is None:
        return "n/a"
    text = f"{delta.value:+.{digits}f}"
    if delta.low is None or delta.high is None:
        return text + " (no interval)"
    text += f" [{delta.low:+.{digits}f}, {delta.high:+.{digits}f}]"
    return text + (f" {SIGNIFICANT_MARK}" if delta.excludes_zero else "")


def _kind_notes(runs: Sequence[Run]) -> list[str]:
    quantized = [r for r in runs if not r.is_baseline]
    packed = [r for r in quantized if r.kind == "packed"]
    simulated = [r for r in quantized if r.kind == "simulated"]
    unknown = [r for r in quantized if r.kind == "unknown"]
    notes = []
    if simulated:
        which = (f"All {len(simulated)} quantized rows are simulated" if len(simulated) == len(quantized)
                 else f"Simulated ({len(simulated)} of {len(quantized)} quantized rows)")
        notes.append(f"{which}: weights quantized and stored back in the checkpoint's dtype; bpw and size are "
                     "the quantization report's computed ones.")
    if packed:
        listed = "; ".join(f"{Path(r.pretrained).name} {r.label} ({r.report.export.format}, file "
                           f"{fmt_size(r.report.export.file_bytes) or 'size not measured'})" for r in packed)
        notes.append(f"Packed ({len(packed)} rows): exported integer weights, the file size measured on disk "
                     f"next to the computed bpw: {listed}.")
    if unknown:
        notes.append(f"{len(unknown)} quantized row(s) without a quantization report beside their results: "
                     "no bpw, no size, kind unknown.")
    return notes


def build_table(collection: Collection, headline: dict[str, str] | None = None,
                context: IntervalContext | None = None) -> Table:
    runs = collection.runs
    metrics = metric_columns(runs)
    components = component_names(runs)
    headlines = choose_headlines(runs, headline)
    any_packed = any(r.kind == "packed" for r in runs)
    columns = [Column("model", "model", False, True), Column("label", "configuration", False, True),
               Column("bpw", "bpw (incl. overhead)", True, True)]
    if any_packed:
        columns.append(Column("file_bytes", "packed file (bytes)", True, True))
    for task, metric in headlines:
        columns += [Column(f"m:{task}:{metric}", f"{task} {metric}", True, True),
                    Column(f"d:{task}:{metric}", f"Δ {task} {metric}", True, True)]
    columns += [Column("id", "id", False), Column("method", "method", False), Column("kind", "kind", False)]
    columns += [Column(f"bits:{c}", f"bits {c}", True) for c in components]
    columns += [Column("size", "size (bytes)", True), Column("quantized_params", "quantized params", True),
                Column("docs", "docs", False)]
    if any_packed:
        columns += [Column("export_format", "export format", False),
                    Column("loaded_memory_bytes", "loaded memory (bytes)", True),
                    Column("export_device", "export device", False)]
    for task, metric in metrics:
        if (task, metric) not in headlines:
            columns += [Column(f"m:{task}:{metric}", f"{task} {metric}", True),
                        Column(f"d:{task}:{metric}", f"Δ {task} {metric}", True)]

    owned = context is None
    context = context or IntervalContext()
    context.prepare([r.samples_path for run in runs for r in run.tasks.values() if r.samples_path is not None])
    rows, display, significant, deltas = [], [], [], []
    notes: dict[str, None] = {}
    try:
        for run in runs:
            row, shown, marked, row_deltas = _row(run, runs, metrics, components, context, notes)
            rows.append(row)
            display.append(shown)
            significant.append(marked)
            deltas.append(row_deltas)
    finally:
        if owned:
            context.close()

    heads = []
    for task, metric in headlines:
        key = f"{task}:{metric}"
        heads.append(Headline(task, metric, _digits([r[f"m:{key}"] for r in rows if r.get(f"m:{key}") is not None])))
    compact = []
    for run, row, shown, row_deltas in zip(runs, rows, display, deltas):
        texts = {c.key: shown.get(c.key, "") for c in columns if c.compact}
        texts["bpw"] = _fmt_number(run.bpw, 2) if run.bpw is not None else ""
        for h in heads:
            key = f"{h.task}:{h.metric}"
            value = row.get(f"m:{key}")
            texts[f"m:{key}"] = "" if value is None else f"{value:.{h.digits}f}"
            texts[f"d:{key}"] = "" if value is None else _compact_delta(row_deltas.get(key), run.is_baseline, h.digits)
        compact.append(texts)

    notes_list = [f"Δ: the score minus the FP16 baseline's (same model, same documents); [low, high]: its "
                  f"{CONFIDENCE:.0%} paired bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the documents, the "
                  f"same ones for the configuration and its baseline). Corpus metrics are recomputed on every "
                  f"resample (CIDEr, BLEU, ROUGE-L, METEOR from captions tokenized once; retrieval R@K over the "
                  f"resampled images and their captions). {SIGNIFICANT_MARK}: the interval excludes 0."]
    if headlines:
        notes_list.append("Headline metric per task (`--headline TASK=METRIC` changes it): "
                          + "; ".join(f"{t}: {m}" for t, m in headlines)
                          + ". Every metric, with its Δ and interval, is in leaderboard.csv and behind "
                            "'all metrics' on the page.")
    notes_list.append(f"Rows: {len(runs)} configurations, grouped by model; the FP16 baseline first, then by "
                      "method and, within a method, by bits per weight (highest first). bpw: the quantization "
                      f"report's bits per weight against the {FP_BITS}-bit baseline, scale and zero-point "
                      f"overhead included; the FP16 baseline is {FP_BITS}. bits fp ({FP_BITS} in the CSV): the "
                      "component was left in floating point.")
    notes_list += _kind_notes(runs)
    for name, (parts, what) in DERIVED_METRICS.items():
        if any(metric.partition(",")[0] == name for _, metric in metrics):
            notes_list.append(f"{name}: {what} ({' and '.join(parts)}), computed by the leaderboard.")
    notes_list += list(notes)
    if collection.failed:
        notes_list.append("Failed configurations (not in the table; rerun the sweep to retry): "
                          + "; ".join(f"{d.get('label')} [{d.get('run_id')}]: {d.get('error')}" for d in collection.failed))
    if collection.incomplete:
        notes_list.append(f"{len(collection.incomplete)} interrupted or running configuration(s) ignored.")
    return Table(columns, rows, display, notes_list, heads, compact, significant)


def _row(run: Run, runs: Sequence[Run], metrics, components, context: IntervalContext, notes: dict):
    export = run.report.export
    row: dict[str, Any] = {
        "id": run.run_id, "model": Path(run.pretrained).name or run.pretrained, "label": run.label,
        "method": run.method, "kind": run.kind, "bpw": run.bpw, "size": run.report.size_bytes,
        "quantized_params": run.report.quantized_params,
        "file_bytes": export.file_bytes if export else None,
        "loaded_memory_bytes": export.loaded_memory_bytes if export else None,
        "export_format": export.format if export else None, "export_device": export.device if export else None,
    }
    shown = {k: "" if v is None else str(v) for k, v in row.items()}
    shown["bpw"] = _fmt_number(run.bpw, 3) if run.bpw is not None else ""
    shown["size"] = fmt_size(run.report.size_bytes)
    shown["file_bytes"] = fmt_size(row["file_bytes"])
    shown["loaded_memory_bytes"] = fmt_size(row["loaded_memory_bytes"])
    for name in components:
        bits = run.report.component_bits.get(name)
        row[f"bits:{name}"] = bits if isinstance(bits, (int, float)) else None
        shown[f"bits:{name}"] = "" if bits is None else "fp" if bits == FP_BITS else str(bits)
    limited = [f"{t}: {r.n_effective}/{r.n_original}" for t, r in sorted(run.tasks.items())
               if r.n_effective is not None and r.n_original is not None and r.n_effective < r.n_original]
    row["docs"] = shown["docs"] = "; ".join(limited) or "all"
    if limited:
        notes["Rows whose docs column is not 'all' ran with --limit: smoke runs, not comparable with "
              "full-split scores (CIDEr's document frequencies in particular depend on the set)."] = None
    marked, deltas = set(), {}
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
        delta = delta_vs_baseline(run, baseline, task, metric, context) if baseline else Delta(
            None, note="no FP16 baseline of this model on the same documents")
        deltas[key] = delta
        row[f"d:{key}"] = delta.value
        row[f"d:{key}:ci_low"], row[f"d:{key}:ci_high"] = delta.low, delta.high
        shown[f"d:{key}"] = delta.text()
        if delta.excludes_zero:
            marked.add(f"d:{key}")
        if delta.note:
            notes[f"{task} {metric}: {delta.note}."] = None
    return row, shown, marked, deltas


def compact_markdown(table: Table) -> str:
    """The compact table alone (model, configuration, bpw, headline metrics with Δ and interval)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    columns = table.compact_columns
    titles = [c.title + (f" [{CONFIDENCE:.0%} CI]" if c.key.startswith("d:") else "") for c in columns]
    lines = ["| " + " | ".join(cell(t) for t in titles) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
    for texts in table.compact:
        lines.append("| " + " | ".join(cell(texts.get(c.key, "")) for c in columns) + " |")
    return "\n".join(lines)


def to_markdown(table: Table) -> str:
    lines = ["# lmms-quant leaderboard", "", compact_markdown(table), ""]
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Every column; a Δ column is followed by its interval bounds. Order: identity, bits and sizes,
    then every metric (sorted by task and metric)."""
    order = {"id": 0, "model": 1, "label": 2, "method": 3, "kind": 4}
    first = sorted((c for c in table.columns if c.key in order), key=lambda c: order[c.key])
    metric_cols = sorted((c for c in table.columns if c.key[:2] in ("m:", "d:")),
                         key=lambda c: (c.key[2:], c.key[0] == "d"))
    middle = [c for c in table.columns if c not in first and c not in metric_cols]
    keys, titles = [], []
    for column in first + middle + metric_cols:
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
