"""Time the leaderboard's caption-metric intervals at COCO Karpathy-test scale (CPU, no model, no data).

    python scripts/bench_leaderboard_intervals.py [--docs 5000] [--refs 5] [--resamples 2000] [--meteor]

Synthetic captions (a Zipf vocabulary of 3,000 words, 8-14 words each) for a baseline and a
configuration; per metric: the time to build the statistic of one run from tokenized captions, and
to compute its 2,000 bootstrap replicates (a configuration's cost; the baseline's are computed once
per leaderboard). --meteor also times METEOR (one Java process; needs a Java runtime).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmms_quant.leaderboard.captions import (BleuStatistic, CiderStatistic, MeteorProcess, MeteorStatistic,
                                             rouge_statistic)


def corpus(n_docs: int, n_refs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()

    def sentence():
        return " ".join(rng.choice(vocab, size=rng.integers(8, 15), p=weights))

    refs = [[sentence() for _ in range(n_refs)] for _ in range(n_docs)]
    preds = [r[0] if rng.random() < 0.3 else sentence() for r in refs]
    return preds, refs


def timed(label: str, make, resamples: int) -> None:
    started = time.perf_counter()
    statistic = make()
    built = time.perf_counter() - started
    started = time.perf_counter()
    statistic.replicates(resamples)
    print(f"{label:<8} build {built:7.2f} s   {resamples} replicates {time.perf_counter() - started:7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--meteor", action="store_true")
    args = parser.parse_args()
    preds, refs = corpus(args.docs, args.refs)
    print(f"{args.docs} documents x {args.refs} references")
    timed("CIDEr", lambda: CiderStatistic(preds, refs), args.resamples)
    timed("BLEU-4", lambda: BleuStatistic(preds, refs, 4), args.resamples)
    timed("ROUGE-L", lambda: rouge_statistic(preds, refs), args.resamples)
    if args.meteor:
        process = MeteorProcess()
        try:
            timed("METEOR", lambda: MeteorStatistic(process.segment_stats(preds, refs), process), args.resamples)
        finally:
            process.close()


if __name__ == "__main__":
    main()
