"""The leaderboard's intervals: every resampled metric equals its reference implementation on resamples
(with repeated documents), and the paired bootstrap interval covers the true difference in about 95% of
simulated experiments where the truth is known.

References: pycocoevalcap's own scorers (CIDEr, BLEU, METEOR) run on the resampled corpus spelt out
document by document; lmms_quant.retrieval.recall_metrics on the resampled rank records.
"""

import shutil

import numpy as np
import pytest

from lmms_quant.leaderboard.bootstrap import (MeanStatistic, bootstrap_ci, paired_interval, resample_indices,
                                              resample_weights)
from lmms_quant.leaderboard.captions import (BleuStatistic, CiderStatistic, MeteorProcess, MeteorStatistic,
                                             ptb_tokenize, rouge_statistic)
from lmms_quant.leaderboard.stats import RecallStatistic

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime (scripts/bootstrap.sh installs one)")

COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SHAPES = ("square", "circle", "triangle", "star")
PLACES = ("left", "right", "top", "bottom", "middle")


def caption_world(rng, n: int, errors: tuple[float, ...]):
    """n documents with three references each, and one system per error rate. The systems share each
    document's random draw, so their captions are paired: a better system errs on a subset of the docs
    a worse one errs on."""
    colour, shape, place = (rng.integers(0, len(c), n) for c in (COLOURS, SHAPES, PLACES))
    refs = [[f"a {COLOURS[c]} {SHAPES[s]} on the {PLACES[p]}", f"a {COLOURS[c]} {SHAPES[s]}",
             f"{COLOURS[c]} {SHAPES[s]} at the {PLACES[p]}"] for c, s, p in zip(colour, shape, place)]
    u = rng.random(n)
    systems = []
    for err in errors:
        preds = []
        for i, (c, s, p) in enumerate(zip(colour, shape, place)):
            other = COLOURS[(c + 1) % len(COLOURS)]
            preds.append(refs[i][0] if u[i] < 1 - err else
                         f"a {other} {SHAPES[s]} on the {PLACES[p]}" if u[i] < 1 - err / 2 else f"a {other} thing")
        systems.append(preds)
    return refs, systems


def resampled(indices, *lists):
    return [[values[i] for i in indices] for values in lists]


# --------------------------------------------------------------------------- each statistic = its reference


def test_cider_on_resamples_with_repeated_documents_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    rng = np.random.default_rng(0)
    refs, (preds,) = caption_world(rng, 40, (0.4,))
    preds[3], refs[5] = "", refs[5][:1]  # an empty caption, a single reference
    statistic = CiderStatistic(preds, refs)
    indices = next(resample_indices(40, resamples=4, seed=1))
    for idx, mine in zip(indices, statistic.on_weights(resample_weights(indices, 40))):
        p, r = resampled(idx, preds, refs)
        theirs, _ = Cider().compute_score(dict(enumerate(r)), {j: [c] for j, c in enumerate(p)})
        assert mine == pytest.approx(theirs, rel=1e-12)
    theirs, _ = Cider().compute_score(dict(enumerate(refs)), {j: [c] for j, c in enumerate(preds)})
    assert statistic.value() == pytest.approx(theirs, rel=1e-12)


def test_bleu_on_resamples_with_repeated_documents_equals_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    rng = np.random.default_rng(1)
    refs, (preds,) = caption_world(rng, 30, (0.5,))
    preds[0] = "a"  # shorter than every reference: the brevity penalty applies
    indices = next(resample_indices(30, resamples=3, seed=2))
    weights = resample_weights(indices, 30)
    for order in (1, 2, 3, 4):
        statistic = BleuStatistic(preds, refs, order)
        for idx, mine in zip(indices, statistic.on_weights(weights)):
            p, r = resampled(idx, preds, refs)
            theirs, _ = Bleu(4).compute_score(dict(enumerate(r)), {j: [c] for j, c in enumerate(p)}, verbose=0)
            assert mine == pytest.approx(theirs[order - 1], rel=1e-12)


def test_rouge_l_is_the_mean_of_pycocoevalcaps_per_document_scores():
    from pycocoevalcap.rouge.rouge import Rouge

    refs, (preds,) = caption_world(np.random.default_rng(2), 20, (0.5,))
    theirs, _ = Rouge().compute_score(dict(enumerate(refs)), {j: [c] for j, c in enumerate(preds)})
    assert rouge_statistic(preds, refs).value() == pytest.approx(theirs, rel=1e-12)


def test_recall_on_resamples_equals_recall_metrics_of_the_resampled_rank_records():
    from lmms_quant.retrieval import METRICS, recall_metrics

    rng = np.random.default_rng(3)
    records = [{"i2t_rank": int(rng.integers(0, 12)), "t2i_ranks": [int(r) for r in rng.integers(0, 12, rng.integers(1, 4))]}
               for _ in range(25)]
    indices = next(resample_indices(25, resamples=3, seed=4))
    for metric in (*METRICS, "r1_mean"):
        statistic = RecallStatistic(records, metric)
        for idx, mine in zip(indices, statistic.on_weights(resample_weights(indices, 25))):
            chosen = [records[i] for i in idx]
            theirs = recall_metrics([r["i2t_rank"] for r in chosen], [t for r in chosen for t in r["t2i_ranks"]])
            theirs["r1_mean"] = (theirs["i2t_r1"] + theirs["t2i_r1"]) / 2
            assert mine == pytest.approx(theirs[metric], rel=1e-12)


def _meteor_of_segments(process: MeteorProcess, stats: np.ndarray) -> float:
    """METEOR's own aggregation, as pycocoevalcap's Meteor.compute_score asks for it: one EVAL line with
    every segment's statistics, answered by each segment's score, then the corpus score."""
    segments = [" ".join(repr(float(x)) for x in row) for row in stats]
    process.proc.stdin.write(("EVAL ||| " + " ||| ".join(segments) + "\n").encode())
    process.proc.stdin.flush()
    for _ in segments:
        process.proc.stdout.readline()
    return float(process.proc.stdout.readline())


@needs_java
def test_meteor_from_summed_statistics_equals_meteors_own_aggregation_of_the_resampled_segments():
    refs, (preds,) = caption_world(np.random.default_rng(5), 16, (0.5,))  # about half are perfect matches
    process = MeteorProcess()  # one JVM (METEOR loads its paraphrase table: seconds)
    try:
        stats = process.segment_stats(preds, refs)
        statistic = MeteorStatistic(stats, process)
        assert statistic.value() == pytest.approx(_meteor_of_segments(process, stats), rel=1e-12)
        indices = next(resample_indices(16, resamples=4, seed=6))
        for idx, mine in zip(indices, statistic.on_weights(resample_weights(indices, 16))):
            assert mine == pytest.approx(_meteor_of_segments(process, stats[idx]), rel=1e-12)
    finally:
        process.close()


@needs_java
def test_captions_are_tokenized_in_one_call_as_pycocoevalcaps_ptb_tokenizer_does_one_by_one():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = ["A Red Square.", "", "two  blue circles, on the left!", "a dog's bone", "A Red Square."]
    one_by_one = [PTBTokenizer().tokenize({0: [{"caption": t}]})[0][0] for t in texts]
    assert ptb_tokenize(texts) == one_by_one
    # a line break inside a caption would shift every later line of the tokenizer's output
    assert ptb_tokenize(["a red\rsquare", "a blue circle"]) == ["a red square", "a blue circle"]


# --------------------------------------------------------------------------- paired


def test_paired_interval_of_a_configuration_against_itself_is_zero_wide():
    refs, (preds,) = caption_world(np.random.default_rng(7), 30, (0.4,))
    assert paired_interval(CiderStatistic(preds, refs), CiderStatistic(preds, refs), resamples=200) == (0.0, 0.0)
    scores = np.random.default_rng(8).random(30)
    assert paired_interval(MeanStatistic(scores), MeanStatistic(scores)) == (0.0, 0.0)


def test_paired_interval_of_means_is_the_bootstrap_of_the_per_document_differences():
    rng = np.random.default_rng(9)
    x, y = rng.random(50), rng.random(50)
    assert paired_interval(MeanStatistic(x), MeanStatistic(y)) == bootstrap_ci(x - y)
    # the same resampled documents for both: the generic path gives the same interval
    generic = np.percentile(MeanStatistic(x).replicates() - MeanStatistic(y).replicates(), [2.5, 97.5])
    assert bootstrap_ci(x - y) == pytest.approx(tuple(generic), abs=1e-12)


# --------------------------------------------------------------------------- coverage where the truth is known

EXPERIMENTS = 200


def _coverage(truth: float, intervals) -> float:
    return sum(low <= truth <= high for low, high in intervals) / EXPERIMENTS


def test_mean_interval_covers_the_true_difference_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(10)
    intervals = []
    for experiment in range(EXPERIMENTS):
        baseline = (rng.random(60) < 0.7).astype(float)
        # the configuration loses 15% of the baseline's hits and gains 5% of its misses: truth −0.09
        u = rng.random(60)
        config = np.where(baseline == 1, u >= 0.15, u < 0.05).astype(float)
        intervals.append(paired_interval(MeanStatistic(config), MeanStatistic(baseline), resamples=1000, seed=experiment))
    assert 0.90 <= _coverage(0.05 * 0.3 - 0.15 * 0.7, intervals) <= 0.99


def test_cider_interval_covers_the_population_difference_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(11)
    refs, (baseline, config) = caption_world(rng, 4000, (0.3, 0.45))
    truth = CiderStatistic(config, refs).value() - CiderStatistic(baseline, refs).value()
    intervals = []
    for experiment in range(EXPERIMENTS):
        docs = rng.choice(len(refs), 40, replace=False)
        r, b, c = resampled(docs, refs, baseline, config)
        intervals.append(paired_interval(CiderStatistic(c, r), CiderStatistic(b, r), resamples=300, seed=experiment))
    assert 0.90 <= _coverage(truth, intervals) <= 0.99


def test_recall_interval_covers_the_true_difference_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(12)
    # per query the same draw decides both systems' hit at rank 0: P(hit) 0.8 (baseline), 0.7 (config)
    true_difference = 100 * (0.7 - 0.8)
    intervals = []
    for experiment in range(EXPERIMENTS):
        records = {"baseline": [], "config": []}
        for _ in range(40):  # images, each with 1-3 captions
            u, v = rng.random(), rng.random(rng.integers(1, 4))
            for name, p in (("baseline", 0.8), ("config", 0.7)):
                records[name].append({"i2t_rank": 0 if u < p else 5, "t2i_ranks": [0 if x < p else 5 for x in v]})
        intervals.append(paired_interval(RecallStatistic(records["config"], "r1_mean"),
                                         RecallStatistic(records["baseline"], "r1_mean"), resamples=1000, seed=experiment))
    assert 0.90 <= _coverage(true_difference, intervals) <= 0.99
