"""leaderboard.html: one self-contained page (CSS, JS and SVG inline; works offline).

The first screen is the compact table — model, configuration, bpw and one headline metric per task
with its Δ and interval, a Δ whose interval excludes 0 in bold with a star — and "all metrics" shows
every other column. Below: the Pareto plots and the sensitivity heatmaps. The CSS and JS are the
package's ``static/`` files, inlined.
"""

from __future__ import annotations

import html
from importlib import resources

from lmms_quant.leaderboard.bootstrap import CONFIDENCE
from lmms_quant.leaderboard.collect import Collection
from lmms_quant.leaderboard.plots import heatmap_svg, pareto_svg, variant
from lmms_quant.leaderboard.table import Table


def _static(name: str) -> str:
    return resources.files("lmms_quant.leaderboard").joinpath("static", name).read_text(encoding="utf-8")


def _headline(column, headlines):
    return next((h for h in headlines if column.key[2:] == f"{h.task}:{h.metric}"), None) if column.compact else None


def _header(column, headlines) -> str:
    head = _headline(column, headlines)
    if head is None and column.compact and " (" in column.title:  # "bpw (incl. overhead)": note below
        title, _, note = column.title.partition(" (")
        inner = f'{html.escape(title)}<span class="task">{html.escape(note.rstrip(")"))}</span>'
    elif head is None:
        inner = html.escape(column.title)
    elif column.key.startswith("m:"):
        inner = f'{html.escape(head.metric)}<span class="task">{html.escape(head.task)}</span>'
    else:
        inner = f'Δ {html.escape(head.metric)}<span class="task">vs FP16 [{CONFIDENCE:.0%} CI]</span>'
    classes = "headline" if head else ("compact" if column.compact else "detail")
    cls = f' class="{classes}"' if classes else ""
    return (f'<th{cls} data-key="{html.escape(column.key)}" data-type="{"num" if column.numeric else "text"}">'
            f'{inner}</th>')


def _delta_inner(row, key: str, digits: int) -> str:
    """A headline Δ: the point on one line, its interval below it."""
    low, high = row.get(f"{key}:ci_low"), row.get(f"{key}:ci_high")
    interval = "no interval" if low is None or high is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"
    return f'<span class="d">{row[key]:+.{digits}f}</span><span class="ci">{interval}</span>'


def _cell(column, headlines, row, shown, compact, significant) -> str:
    value = row.get(column.key)
    data = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
    classes = (["num"] if column.numeric else []) + ([] if column.compact else ["detail"])
    if column.key == "label":
        classes.append("label")
    head = _headline(column, headlines)
    if column.key in significant:
        classes.append("sig")
    if head is not None and column.key.startswith("d:") and value is not None:
        inner = _delta_inner(row, column.key, head.digits)
    else:
        inner = html.escape(compact.get(column.key, "") if column.compact else shown.get(column.key, ""))
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f'<td{cls} data-value="{html.escape(data)}">{inner}</td>'


def to_html(table: Table, collection: Collection) -> str:
    runs = collection.runs
    head = "".join(_header(c, table.headlines) for c in table.columns)
    body = []
    for row, shown, compact, significant in zip(table.rows, table.display, table.compact, table.significant):
        cells = "".join(_cell(c, table.headlines, row, shown, compact, significant) for c in table.columns)
        cls = ' class="baseline"' if row.get("kind") == "baseline" else ""
        body.append(f'<tr data-id="{html.escape(row["id"])}"{cls}>{cells}</tr>')
    methods = sorted({r.method for r in runs})
    rows_by_id = {row["id"]: row for row in table.rows}
    plots, heatmaps = [], []
    for h in table.headlines:
        task, metric = h.task, h.metric
        hib = next((r.tasks[task].higher_is_better.get(metric, True) for r in runs if task in r.tasks), True)
        plots.append(pareto_svg(task, metric, runs, hib, methods))
        for model in sorted({r.pretrained for r in runs if task in r.tasks}):
            mine = [r for r in runs if r.pretrained == model]
            for key in sorted({variant(r) for r in mine if not r.is_baseline}):
                svg = heatmap_svg(rows_by_id[mine[0].run_id]["model"], task, metric, key, mine, rows_by_id, hib)
                if svg:
                    heatmaps.append(svg)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in table.notes)
    details = sum(not c.compact for c in table.columns)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmms-quant leaderboard</title>
<style>{_static("leaderboard.css")}</style></head>
<body>
<h1>lmms-quant leaderboard</h1>
<div class="controls"><input id="filter" type="search" placeholder="filter rows: words that must all appear">
<label><input id="show-all" type="checkbox"> all metrics ({details} more columns)</label>
<span><span id="shown">{len(table.rows)}</span> of {len(table.rows)} configurations shown; click a header to sort.</span>
<span class="legend">Δ vs the FP16 baseline with its {CONFIDENCE:.0%} paired bootstrap interval; <b>bold *</b>: the interval excludes 0.</span></div>
<div class="scroll"><table id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table></div>
<ul class="notes">{notes}</ul>
<h2>Score vs bits per weight (Pareto frontier dashed)</h2>
<div class="plots" id="pareto">{"".join(plots) or "<p>no tasks</p>"}</div>
<h2>Sensitivity: component × bits</h2>
<div class="plots" id="sensitivity">{"".join(heatmaps) or "<p>no configuration quantizes one component alone or all of them at one width</p>"}</div>
<script>{_static("leaderboard.js")}</script>
</body></html>
"""
