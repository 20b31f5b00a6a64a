"""Paired bootstrap over documents: resamples, the statistic interface, percentile intervals.

A resample draws n documents with replacement. Every statistic of a run is evaluated on the same
resamples (the draws depend only on n, the number of resamples and the seed), so the configuration
and its baseline always see the same resampled documents: the interval is of the paired difference.

A statistic is a metric as a function of a multiset of documents, ``on_weights(W)``: W[b, d] is how
many times document d appears in resample b. A mean over documents is ``W @ x / n``; a corpus metric
(CIDEr, BLEU, METEOR, recall over a gallery) recomputes its corpus statistics from the weights.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
RESAMPLE_CHUNK_ELEMENTS = 4_000_000  # doc indices drawn at once (32 MB of int64)


def resample_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """The resamples' document indices, (rows, n) int arrays in chunks; the same for every caller."""
    rng = np.random.default_rng(seed)
    chunk = max(1, RESAMPLE_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        yield rng.integers(0, n, size=(stop - start, n))


def resample_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """(rows, n) document indices -> (rows, n) float counts of each document in each resample."""
    rows = indices.shape[0]
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ci(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of per-document ``differences``, resampling documents."""
    differences = np.asarray(differences, dtype=np.float64)
    means = np.concatenate([differences[idx].mean(axis=1)
                            for idx in resample_indices(len(differences), resamples, seed)])
    return percentile_interval(means, confidence)


class Statistic:
    """A metric of n documents that can be recomputed on any multiset of them (see the module doc)."""

    n: int

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        """The metric for each row of ``weights`` ((rows, n) document counts), shape (rows,)."""
        raise NotImplementedError

    def value(self) -> float:
        """The metric on the documents themselves (each once): must reproduce the reported score."""
        return float(self.on_weights(np.ones((1, self.n)))[0])

    def replicates(self, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
        """The metric on every resample, computed once per (resamples, seed): a baseline's are reused
        by every configuration compared with it."""
        cache = self.__dict__.setdefault("_replicates", {})
        if (resamples, seed) not in cache:
            cache[(resamples, seed)] = np.concatenate([
                self.on_weights(resample_weights(idx, self.n)) for idx in resample_indices(self.n, resamples, seed)])
        return cache[(resamples, seed)]


class MeanStatistic(Statistic):
    """A metric that is the mean of per-document values (VQA accuracy, exact match, ROUGE-L)."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)
        self.n = len(self.values)

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        return weights @ self.values / self.n

    def value(self) -> float:
        return float(self.values.mean())


def paired_interval(mine: Statistic, theirs: Statistic, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of mine − theirs over the same resampled documents; None if a resample
    leaves the metric undefined."""
    if mine.n != theirs.n:
        raise ValueError(f"paired bootstrap: {mine.n} documents against {theirs.n}; valid: the same documents")
    if isinstance(mine, MeanStatistic) and isinstance(theirs, MeanStatistic):
        return bootstrap_ci(mine.values - theirs.values, resamples, seed, confidence)
    differences = mine.replicates(resamples, seed) - theirs.replicates(resamples, seed)
    if not np.all(np.isfinite(differences)):
        return None
    return percentile_interval(differences, confidence)
