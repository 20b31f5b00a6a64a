"""Δ vs the FP16 baseline, with a paired bootstrap 95% interval for every metric the logs allow.

lmms-eval logs, per document, what each metric's ``process_results`` returned. The leaderboard turns
that into a statistic it can recompute on any resample of the documents (bootstrap.py):

- a per-document score (VQA accuracy, exact match): the mean of the resampled scores;
- a retrieval rank record (lmms_quant.retrieval): R@K over the resampled documents — each document
  is an image query with its captions' queries, kept together (the captions of one image are not
  independent); the gallery stays the whole corpus, as the ranks were computed against it;
- a caption scorer's inputs (pred + references): the corpus metric recomputed on the resample from
  captions tokenized once (captions.py).

A statistic is used only when, on the documents themselves, it reproduces the score lmms-eval
reported; otherwise the Δ is shown without an interval and the notes say why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lmms_quant.leaderboard.bootstrap import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, MeanStatistic,
                                              Statistic, paired_interval)
from lmms_quant.leaderboard.captions import CaptionScorer, caption_metric, is_caption_entry
from lmms_quant.leaderboard.collect import DERIVED_METRICS, Run, SampleLog, number, read_sample_log

REPRODUCE_TOLERANCE = 1e-6  # relative: a recomputed metric must equal the reported one to this


@dataclass
class Delta:
    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""  # why there is no interval (or no Δ)

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely on one side of 0: the change is not resampling noise."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 4) -> str:
        if self.value is None:
            return "n/a"
        out = f"{self.value:+.{digits}f}"
        if self.low is not None and self.high is not None:
            out += f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        else:
            out += " (no interval)"
        return out


class RecallStatistic(Statistic):
    """Retrieval R@K (percent) over a multiset of documents, from their logged rank records."""

    def __init__(self, records: Sequence[dict], metric: str):
        from lmms_quant.retrieval import METRICS, RECALL_KS

        if metric not in METRICS and metric not in DERIVED_METRICS:
            raise ValueError(f"retrieval metric: {metric!r}; valid: {', '.join((*METRICS, *DERIVED_METRICS))}")
        self.metric, self.ks, self.n = metric, RECALL_KS, len(records)
        i2t = np.array([r["i2t_rank"] for r in records])
        self.n_captions = np.array([len(r["t2i_ranks"]) for r in records], dtype=np.float64)
        self.i2t_hits = {k: (i2t < k).astype(np.float64) for k in RECALL_KS}
        self.t2i_hits = {k: np.array([sum(rank < k for rank in r["t2i_ranks"]) for r in records], dtype=np.float64)
                         for k in RECALL_KS}

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        images, captions = weights.sum(axis=1), weights @ self.n_captions
        recall = {}
        for k in self.ks:
            recall[f"i2t_r{k}"] = 100.0 * (weights @ self.i2t_hits[k]) / images
            recall[f"t2i_r{k}"] = 100.0 * (weights @ self.t2i_hits[k]) / captions
        for direction in ("i2t", "t2i"):
            recall[f"{direction}_r_mean"] = sum(recall[f"{direction}_r{k}"] for k in self.ks) / len(self.ks)
        recall["r_mean"] = (recall["i2t_r_mean"] + recall["t2i_r_mean"]) / 2
        recall["r1_mean"] = (recall["i2t_r1"] + recall["t2i_r1"]) / 2
        return recall[self.metric]


def _is_rank_record(value) -> bool:
    return isinstance(value, dict) and "i2t_rank" in value and isinstance(value.get("t2i_ranks"), list)


class IntervalContext:
    """Samples logs read once, statistics built once (a baseline's resamples are computed once for
    every configuration compared with it), and the caption scorer's Java processes; close() ends them."""

    def __init__(self, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE):
        self.resamples, self.seed, self.confidence = resamples, seed, confidence
        self._logs: dict[Path, SampleLog] = {}
        self._statistics: dict[tuple[Path, str], Statistic | str] = {}
        self.captions = CaptionScorer()

    def __enter__(self) -> "IntervalContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.captions.close()

    def log(self, path: Path) -> SampleLog:
        if path not in self._logs:
            self._logs[path] = read_sample_log(path)
            log = self._logs[path]
            for name, value in (log.lines[0].items() if log.lines else ()):
                if caption_metric(name) and all(is_caption_entry(v) for v in log.values_of(name)):
                    self.captions.add(str(path), log.values_of(name))  # tokenized with every other log's
                    break
        return self._logs[path]

    def prepare(self, paths: Sequence[Path]) -> None:
        """Read these logs now, so that their captions are tokenized in one batch."""
        for path in paths:
            self.log(path)

    def statistic(self, path: Path, metric: str) -> Statistic | str:
        """The resampling statistic of ``metric`` in the log at ``path``, or why there is none."""
        key = (path, metric)
        if key not in self._statistics:
            self._statistics[key] = self._build(path, metric)
        return self._statistics[key]

    def _build(self, path: Path, metric: str) -> Statistic | str:
        log = self.log(path)
        if log.duplicated:
            return "several logged lines per document (several filters): no per-document values to resample"
        name = metric.partition(",")[0]
        source = DERIVED_METRICS[name][0][0] if name in DERIVED_METRICS else name
        values = log.values_of(source)
        if not values:
            return "the samples log is empty"
        if all(number(v) is not None for v in values):
            return MeanStatistic([number(v) for v in values])
        if all(_is_rank_record(v) for v in values):
            return RecallStatistic(values, name)
        if caption_metric(name) and all(is_caption_entry(v) for v in values):
            return self.captions.statistic(str(path), caption_metric(name))
        return f"the samples log holds no per-document values of {name} that can be resampled"

    def interval(self, mine: Statistic, theirs: Statistic) -> tuple[float, float] | None:
        return paired_interval(mine, theirs, self.resamples, self.seed, self.confidence)


def reproduces(statistic: Statistic, reported: float) -> bool:
    """Whether the statistic gives the reported score on the documents themselves."""
    return abs(statistic.value() - reported) <= REPRODUCE_TOLERANCE * max(1.0, abs(reported))


def delta_vs_baseline(run: Run, baseline: Run, task: str, metric: str,
                      context: IntervalContext | None = None) -> Delta:
    mine, theirs = run.tasks[task], baseline.tasks[task]
    if metric not in theirs.metrics:
        return Delta(None, note="the baseline has no such metric")
    delta = mine.metrics[metric] - theirs.metrics[metric]
    if mine.samples_path is None or theirs.samples_path is None:
        return Delta(delta, note="no logged samples (run with --log_samples)")
    owned = context is None
    context = context or IntervalContext()
    try:
        a, b = context.log(mine.samples_path), context.log(theirs.samples_path)
        if a.doc_ids != b.doc_ids or a.doc_hashes != b.doc_hashes:
            return Delta(None, note="the baseline scored other documents")
        statistics = []
        for path, result in ((mine.samples_path, mine), (theirs.samples_path, theirs)):
            statistic = context.statistic(path, metric)
            if isinstance(statistic, str):
                return Delta(delta, note=statistic)
            if not reproduces(statistic, result.metrics[metric]):
                return Delta(delta, note="recomputed from the logged samples it does not reproduce the reported "
                                         "score: no interval")
            statistics.append(statistic)
        interval = context.interval(*statistics)
        if interval is None:
            return Delta(delta, note="undefined on some resamples: no interval")
        return Delta(delta, *interval)
    finally:
        if owned:
            context.close()


def find_baseline(run: Run, runs: Sequence[Run], task: str) -> Run | None:
    """The FP16 run of the same model (wrapper arguments, placement aside) on the same documents."""
    candidates = [r for r in runs if r.is_baseline and r.baseline_group == run.baseline_group and task in r.tasks
                  and r.tasks[task].n_effective == run.tasks[task].n_effective]
    return min(candidates, key=lambda r: r.run_id) if candidates else None
