"""``lmms-quant leaderboard RUNS_DIR``: one row per configuration, Δ vs FP16 with intervals, Pareto and sensitivity.

Reads every finished configuration under RUNS_DIR — the run directories a sweep writes and plain
``lmms-quant eval --output_path`` directories (collect.py) — and writes, into ``--out`` (default RUNS_DIR):

- ``leaderboard.md``: the compact table — per configuration the model, bits per weight and ONE
  headline metric per task (CIDEr for captions, accuracy for VQA/GQA, mean R@1 for retrieval;
  ``--headline TASK=METRIC`` changes it) with its Δ vs the FP16 baseline and the paired bootstrap
  95% interval (stats.py), then notes: what is simulated and what is packed, what has no interval and why;
- ``leaderboard.csv``: every column — bits per component, size, every metric, every Δ with its bounds;
- ``leaderboard.html``: a self-contained page (page.py): the compact table on the first screen,
  "all metrics" for the rest, a Pareto plot per task and the component × bits heatmap (plots.py).

The outputs carry no timestamps or absolute paths: the same finished configurations always give the
same files, whichever order or how many sweep invocations produced them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmms_quant.atomic import write_text_atomic
from lmms_quant.leaderboard.bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_ci
from lmms_quant.leaderboard.collect import (Collection, Run, TaskResult, collect_runs, parse_model_args, read_samples,
                                            report_facts)
from lmms_quant.leaderboard.page import to_html
from lmms_quant.leaderboard.plots import heatmap_svg, pareto_frontier, pareto_svg, sensitivity_cells
from lmms_quant.leaderboard.stats import Delta, IntervalContext, delta_vs_baseline, find_baseline
from lmms_quant.leaderboard.table import (Column, HeadlineError, Table, build_table, compact_markdown, to_csv,
                                          to_markdown)

__all__ = [
    "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CONFIDENCE", "Collection", "Column", "Delta", "HeadlineError",
    "IntervalContext", "Run", "Table", "TaskResult", "bootstrap_ci", "build_table", "collect_runs",
    "compact_markdown", "delta_vs_baseline", "find_baseline", "heatmap_svg", "main", "pareto_frontier",
    "pareto_svg", "parse_headlines", "parse_model_args", "read_samples", "report_facts", "sensitivity_cells",
    "to_csv", "to_html", "to_markdown", "write_leaderboard",
]


def write_leaderboard(runs_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      headline: dict[str, str] | None = None):
    """Write leaderboard.{md,csv,html}; return (name -> path, the table). ``headline``: task -> metric."""
    collection = collect_runs(runs_dir)
    table = build_table(collection, headline)
    out = Path(out_dir or runs_dir)
    written = {}
    for name, text in (("leaderboard.md", to_markdown(table)), ("leaderboard.csv", to_csv(table)),
                       ("leaderboard.html", to_html(table, collection))):
        write_text_atomic(out / name, text)
        written[name] = out / name
    return written, table


def parse_headlines(values: list[str]) -> dict[str, str]:
    """``--headline TASK=METRIC`` values -> {task: metric}."""
    chosen = {}
    for value in values:
        task, sep, metric = value.partition("=")
        if not sep or not task.strip() or not metric.strip():
            raise HeadlineError(f"--headline: {value!r} is not TASK=METRIC (e.g. coco2017_cap_val=CIDEr)")
        chosen[task.strip()] = metric.strip()
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmms-quant leaderboard",
        description="Tabulate finished lmms-quant runs: Markdown, CSV and a self-contained HTML page.")
    parser.add_argument("runs_dir", help="a sweep's output directory, or any directory of lmms-quant eval outputs")
    parser.add_argument("--out", default=None, help="where to write leaderboard.{md,csv,html} (default RUNS_DIR)")
    parser.add_argument("--headline", action="append", default=[], metavar="TASK=METRIC",
                        help="the headline metric of a task (repeatable; a metric's suffix works: "
                             "coco2017_cap_val=CIDEr). Default: CIDEr, accuracy, mean R@1")
    args = parser.parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"lmms-quant leaderboard: {args.runs_dir!r} is not a directory", file=sys.stderr)
        return 2
    try:
        written, table = write_leaderboard(args.runs_dir, args.out, parse_headlines(args.headline))
    except HeadlineError as err:
        print(f"lmms-quant leaderboard: {err}", file=sys.stderr)
        return 2
    if not table.rows:
        print(f"lmms-quant leaderboard: no finished runs under {args.runs_dir}", file=sys.stderr)
        return 1
    print(f"{len(table.rows)} configurations")
    for path in written.values():
        print(path)
    return 0
