"""The page's SVG plots: score vs bits per weight with the Pareto frontier per task, and the
component × bits sensitivity heatmap.

A heatmap cell is honest about what it shows: it comes only from configurations that quantize that
component ALONE at those bits (every other component in floating point); the row ``all`` comes from
configurations that quantize every component at those bits. Configurations that quantize several
components, or at mixed widths, are in no cell. A cell with no such configuration says "not run".
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from lmms_quant.leaderboard.collect import FP_BITS, Run, component_order

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


ALL_ROW = "all"
# Plan keys that say which components are quantized at which bits: the heatmap's rows and columns.
# Everything else in a plan (method, granularity, group size, ...) is the variant a heatmap is drawn for.
PLACEMENT_PLAN_KEYS = {"component", "bits", "vit_bits", "connector_bits", "llm_bits"}


def variant(run: Run) -> tuple:
    """What a heatmap is drawn for: every resolved plan setting except which components at which bits."""
    return tuple(sorted((k, v) for k, v in run.plan_args.items() if k not in PLACEMENT_PLAN_KEYS))


def variant_name(run: Run) -> str:
    """The variant as the run's label says it (the settings a grid varied), placement words dropped."""
    words = [w for w in run.label.split() if w.partition("=")[0] not in PLACEMENT_PLAN_KEYS]
    return " ".join(words) or run.method


def heatmap_row(run: Run) -> tuple[str, Any] | None:
    """(row, bits) of the one heatmap cell a configuration belongs to, or None: a component quantized
    alone (all others in floating point), or ``all`` for every component at the same bits."""
    bits = {c: b for c, b in run.report.component_bits.items() if c != "other"}
    quantized = {c: b for c, b in bits.items() if b != FP_BITS}
    if not quantized or any(not isinstance(b, (int, float)) for b in quantized.values()):
        return None  # nothing quantized, or a component at mixed widths
    if len(quantized) == 1 and len(bits) > 1:
        return next(iter(quantized.items()))
    if len(quantized) == len(bits) and len(set(quantized.values())) == 1:
        return ALL_ROW, next(iter(quantized.values()))
    return None


def sensitivity_cells(runs: Sequence[Run], rows: dict[str, dict], task: str, metric: str, variant_key: tuple):
    """(row, bits) -> the table rows (with Δ and interval) of the configurations in that cell, and how
    many configurations of this variant are in no cell (several components, mixed widths)."""
    cells: dict[tuple[str, Any], list[dict]] = {}
    left_out = 0
    for run in runs:
        if run.is_baseline or variant(run) != variant_key or task not in run.tasks:
            continue
        row = rows[run.run_id]
        if row.get(f"d:{task}:{metric}") is None:
            continue
        where = heatmap_row(run)
        if where is None:
            left_out += 1
        else:
            cells.setdefault(where, []).append(row)
    return cells, left_out


def heatmap_svg(model: str, task: str, metric: str, variant_key: tuple, runs: Sequence[Run], rows: dict[str, dict],
                higher_is_better: bool) -> str | None:
    """The heatmap of one model's runs of one variant on one task, or None when no run has a cell."""
    cells, left_out = sensitivity_cells(runs, rows, task, metric, variant_key)
    if not cells:
        return None
    components = sorted({c for r in runs for c in r.report.component_bits if c != "other"}, key=component_order)
    row_names = components + [ALL_ROW]
    bits = sorted({b for _, b in cells})
    key = f"d:{task}:{metric}"
    name = variant_name(next(r for r in runs if variant(r) == variant_key))
    means = {where: sum(r[key] for r in found) / len(found) for where, found in cells.items()}
    cw, ch, left, top = 72, 34, 110, 64
    title = f"{model}: {task} {metric}, {name}: Δ vs FP16"
    mode = "a cell: the configuration quantizing only that component (all: every component) at those bits"
    extra = f"{left_out} configuration(s) quantizing several components at mixed widths: in no cell" if left_out else ""
    width = max(left + cw * len(bits) + 20, 6 * max(len(title), len(mode), len(extra)) + 12)
    height = top + ch * len(row_names) + 16
    scale = max(abs(v) for v in means.values()) or 1.0
    parts = [f'<svg class="heatmap" data-task="{html.escape(task)}" data-variant="{html.escape(name)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="4" y="16" class="title">{html.escape(title)}</text>'
             f'<text x="4" y="32" class="tick">{html.escape(mode)}</text>'
             f'<text x="4" y="46" class="tick">{html.escape(extra)}</text>']
    for j, b in enumerate(bits):
        parts.append(f'<text x="{left + cw * j + cw / 2}" y="{top - 4}" text-anchor="middle">{b:g} bits</text>')
    for i, name in enumerate(row_names):
        y = top + ch * i
        parts.append(f'<text x="{left - 6}" y="{y + ch / 2 + 4}" text-anchor="end">{html.escape(name)}</text>')
        for j, b in enumerate(bits):
            x = left + cw * j
            if (name, b) not in cells:
                parts.append(f'<rect class="empty" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="#eee" stroke="#fff"/>'
                             f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" fill="#888">not run</text>')
                continue
            found, value = cells[(name, b)], means[(name, b)]
            good = value if higher_is_better else -value
            ink = "#fff" if abs(good) > 0.6 * scale else "#222"
            sig = len(found) == 1 and _excludes_zero(found[0], key)
            weight = ' font-weight="bold"' if sig else ""
            detail = "; ".join(f"{r['label']}: Δ {r[key]:+.4f}" + _interval(r, key) for r in found)
            parts.append(f'<rect class="cell" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{_diverging(good, scale)}" '
                         f'stroke="#fff"><title>{html.escape(name)} at {b:g} bits: {html.escape(detail)}</title></rect>'
                         f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" fill="{ink}"'
                         f'{weight}>{value:+.3f}{"*" if sig else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}:ci_low"), row.get(f"{key}:ci_high")
    return "" if low is None or high is None else f" [{low:+.4f}, {high:+.4f}]"


def _excludes_zero(row: dict, key: str) -> bool:
    low, high = row.get(f"{key}:ci_low"), row.get(f"{key}:ci_high")
    return low is not None and high is not None and (low > 0 or high < 0)
