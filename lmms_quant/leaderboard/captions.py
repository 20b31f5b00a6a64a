"""Caption corpus metrics (CIDEr, BLEU-1..4, ROUGE-L, METEOR) recomputed on bootstrap resamples.

lmms-eval's caption tasks log, per document, the scorer's inputs (``{"pred", "answer", ...}``), not a
score, and score the corpus with pycocoevalcap: PTBTokenizer (Java) on predictions and references,
then each scorer. To resample documents without launching Java per resample:

- every caption of every log is tokenized ONCE, with pycocoevalcap's own PTBTokenizer, in one Java
  call for the whole leaderboard (tokenization is line by line, so batching changes nothing);
- CIDEr-D, BLEU and ROUGE-L are then computed in Python from the tokens (per-document n-gram counts
  from pycocoevalcap's own ``precook``/``cook_*``; only the corpus aggregation is vectorized here);
- METEOR's per-document statistics come from ONE METEOR process (pycocoevalcap's jar and command
  line) for the whole leaderboard; a resample's statistics are summed here (METEOR's aggregation:
  plain sums, except that a perfectly matched segment adds no chunks) and scored by one ``EVAL`` line
  of 23 numbers to that same process — so its formula and parameters stay METEOR's own.

Each recomputation on the documents themselves must reproduce the score lmms-eval reported (checked
by the caller) before its interval is shown.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import threading

import numpy as np
from scipy import sparse

from lmms_quant.leaderboard.bootstrap import MeanStatistic, Statistic

from lmms_quant.caption_metrics import METRICS as CAPTION_METRICS  # noqa: E402
# Characters Java reads as line ends: in a caption they would shift every later tokenized line.
_JAVA_LINE_BREAKS = re.compile("[\r\n\u0085\u2028\u2029\x0b\x0c]")
CIDER_CHUNK_ELEMENTS = 4_000_000  # n-grams x resamples of idf held at once (32 MB)
METEOR_STATS = 23  # MeteorStats.STATS_LENGTH of METEOR 1.5


def caption_metric(name: str) -> str | None:
    """The pycocoevalcap metric a task's metric name is (coco_CIDEr, flickr_Bleu_4 -> CIDEr, Bleu_4)."""
    for metric in CAPTION_METRICS:
        if name == metric or name.endswith("_" + metric):
            return metric
    return None


def is_caption_entry(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("pred"), str) and isinstance(value.get("answer"), list)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (lower case, punctuation dropped) on every text, in one Java call."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    unique = sorted({_JAVA_LINE_BREAKS.sub(" ", t) for t in texts})
    if not unique:
        return []
    tokenized = PTBTokenizer().tokenize({0: [{"caption": t} for t in unique]}).get(0, [])
    if len(tokenized) != len(unique):
        raise RuntimeError(f"PTBTokenizer returned {len(tokenized)} lines for {len(unique)} captions")
    table = dict(zip(unique, tokenized))
    return [table[_JAVA_LINE_BREAKS.sub(" ", t)] for t in texts]


# --------------------------------------------------------------------------- CIDEr-D


def _bigram_count(counts: dict) -> int:
    # pycocoevalcap's CIDEr "length" of a sentence counts its bigrams (n == 1 there is the 2-gram
    # index): kept as is, since the Gaussian length penalty must match the reported score.
    return sum(c for g, c in counts.items() if len(g) == 2)


class CiderStatistic(Statistic):
    """CIDEr-D as pycocoevalcap's Cider() computes it (n = 4, sigma = 6), on any multiset of docs.

    Per doc and reference and n-gram order: the cosine of tf-idf vectors, with the hypothesis's
    weights clipped to the reference's, times a Gaussian length penalty; averaged over orders and
    references, times 10; the corpus score is the mean over docs. idf = log(#docs) − log(max(1, df)),
    df counting the docs whose references hold the n-gram — it depends on the set of docs, so every
    resample recomputes it. Every sum over n-grams in the cosine is linear in idf² (idf ≥ 0, so
    min(a·idf, b·idf) = min(a, b)·idf): with the counts laid out once as sparse matrices, a batch of
    resamples costs a few sparse products. Most 3- and 4-grams occur in one document's references
    only; their df on a resample is that document's weight, so their terms are summed once per row
    and only the n-grams shared between documents go through the products (_IdfSums).
    """

    def __init__(self, preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0):
        from pycocoevalcap.cider.cider_scorer import precook

        self.n, self.order = len(preds), n
        vocab: dict[tuple, int] = {}
        # sparse entries of the four count matrices: rows, n-gram ids, values (flat lists: this loop
        # is the cost of building the statistic, ~100 entries per document)
        df, hyp_sq, ref_sq, clip = ([], [], []), ([], [], []), ([], [], []), ([], [], [])
        pair_doc, penalty, n_refs = [], [], []
        for doc, (pred, references) in enumerate(zip(preds, refs)):
            if not references:
                raise ValueError(f"CIDEr: document {doc} has no reference caption")
            hyp = precook(pred, n)
            hyp_length = _bigram_count(hyp)
            for gram, count in hyp.items():
                hyp_sq[0].append(doc * n + len(gram) - 1)
                hyp_sq[1].append(vocab.setdefault(gram, len(vocab)))
                hyp_sq[2].append(count * count)
            in_refs = set()
            for reference in references:
                pair = len(pair_doc)
                ref = precook(reference, n)
                for gram, count in ref.items():
                    row, gid = pair * n + len(gram) - 1, vocab.setdefault(gram, len(vocab))
                    in_refs.add(gid)
                    ref_sq[0].append(row)
                    ref_sq[1].append(gid)
                    ref_sq[2].append(count * count)
                    if gram in hyp:
                        clip[0].append(row)
                        clip[1].append(gid)
                        clip[2].append(min(hyp[gram], count) * count)
                delta = hyp_length - _bigram_count(ref)
                penalty.append(math.exp(-(delta ** 2) / (2 * sigma ** 2)))
                pair_doc.append(doc)
            df[0].extend([doc] * len(in_refs))
            df[1].extend(in_refs)
            df[2].extend([1] * len(in_refs))
            n_refs.append(len(references))
        n_grams = len(vocab)
        self.pair_doc = np.array(pair_doc, dtype=np.int64)

        def arrays(entries):
            return (np.array(entries[0], np.int64), np.array(entries[1], np.int64), np.array(entries[2], np.float64))

        df_docs, df_grams, _ = arrays(df)
        ref_docs = np.bincount(df_grams, minlength=n_grams)  # how many docs' references hold each n-gram
        owner = np.full(n_grams, -1, dtype=np.int64)
        owner[df_grams] = df_docs  # the doc, for the n-grams of one doc's references
        hyp_rows, ref_rows = np.repeat(np.arange(self.n), n), np.repeat(self.pair_doc, n)  # row -> doc
        parts = [(arrays(hyp_sq), hyp_rows), (arrays(ref_sq), ref_rows), (arrays(clip), ref_rows)]
        shared = np.zeros(n_grams, dtype=bool)
        for (rows, grams, _), row_doc in parts:
            shared[grams[(ref_docs[grams] >= 2) | ((ref_docs[grams] == 1) & (owner[grams] != row_doc[rows]))]] = True
        self.shared = np.flatnonzero(shared)
        column = np.full(n_grams, -1, dtype=np.int64)
        column[self.shared] = np.arange(len(self.shared))
        keep = np.isin(df_grams, self.shared)
        self.df_t = sparse.csr_matrix((np.ones(keep.sum()), (column[df_grams[keep]], df_docs[keep])),
                                      shape=(len(self.shared), self.n))  # df of the shared n-grams = df_t @ w
        # per row: Σ tf_h² idf² (doc, order), Σ tf_r² idf² (pair, order), Σ min(tf_h, tf_r) tf_r idf² (pair, order)
        self.hyp_norm2, self.ref_norm2, self.clipped = (
            _IdfSums(entries, row_doc, len(row_doc), ref_docs, owner, column) for entries, row_doc in parts)
        self.penalty = np.array(penalty)
        self.n_refs = np.array(n_refs, dtype=np.float64)
        self.doc_starts = np.concatenate([[0], np.cumsum(self.n_refs[:-1])]).astype(np.int64)

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        out = np.empty(weights.shape[0])
        step = max(1, CIDER_CHUNK_ELEMENTS // max(len(self.shared), self.n, 1))
        n, pairs, log_n = self.order, len(self.pair_doc), np.log(float(self.n))
        for start in range(0, weights.shape[0], step):
            w = weights[start:start + step]
            cols = w.shape[0]
            shared_idf2 = (log_n - np.log(np.maximum(self.df_t @ w.T, 1.0))) ** 2  # (shared n-grams, cols)
            own_idf2 = (log_n - np.log(np.maximum(w.T, 1.0))) ** 2  # (docs, cols): an n-gram of one doc's refs
            sums = [m.apply(shared_idf2, own_idf2, log_n ** 2) for m in (self.clipped, self.hyp_norm2, self.ref_norm2)]
            clipped = sums[0].reshape(pairs, n, cols)
            hyp = sums[1].reshape(self.n, n, cols)[self.pair_doc]
            ref = sums[2].reshape(pairs, n, cols)
            both = (hyp != 0) & (ref != 0)  # pycocoevalcap divides only when both norms are non-zero
            cosine = np.where(both, clipped / np.sqrt(np.where(both, hyp * ref, 1.0)), clipped)
            per_pair = cosine.sum(axis=1) * self.penalty[:, None]  # (pairs, cols)
            per_doc = np.add.reduceat(per_pair, self.doc_starts, axis=0) * 10.0 / (n * self.n_refs[:, None])
            out[start:start + cols] = (w * per_doc.T).sum(axis=1) / self.n
        return out


class _IdfSums:
    """Σ_g value[row, g] · idf_g² for every row of a sparse count matrix, split by what idf_g depends on:
    n-grams in no document's references (idf = log #docs: summed once), n-grams only in the row's own
    document's references (idf from that document's weight alone: summed once), and shared n-grams
    (a sparse product with their recomputed idf²)."""

    def __init__(self, entries, row_doc: np.ndarray, n_rows: int, ref_docs: np.ndarray, owner: np.ndarray,
                 column: np.ndarray):
        rows, grams, values = entries
        unseen = ref_docs[grams] == 0
        own = (ref_docs[grams] == 1) & (owner[grams] == row_doc[rows])
        general = ~(unseen | own)
        self.unseen = np.bincount(rows[unseen], weights=values[unseen], minlength=n_rows)
        self.own = np.bincount(rows[own], weights=values[own], minlength=n_rows)
        self.row_doc = row_doc
        self.shared = sparse.csr_matrix((values[general], (rows[general], column[grams[general]])),
                                        shape=(n_rows, int(column.max()) + 1 if column.size else 0))

    def apply(self, shared_idf2: np.ndarray, own_idf2: np.ndarray, unseen_idf2: float) -> np.ndarray:
        return (self.shared @ shared_idf2 + self.own[:, None] * own_idf2[self.row_doc]
                + self.unseen[:, None] * unseen_idf2)


# --------------------------------------------------------------------------- BLEU


class BleuStatistic(Statistic):
    """BLEU-k as pycocoevalcap's Bleu(4) scores a corpus (effective reference length "closest").

    Per doc: hypothesis length, the closest reference length (ties to the shorter), and per n-gram
    order the guessed and clipped correct counts; the corpus score comes from their sums, so a
    resample is one matrix product.
    """

    TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's guards against 0/0

    def __init__(self, preds: list[str], refs: list[list[str]], order: int):
        from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

        rows = []
        for pred, references in zip(preds, refs):
            comps = cook_test(pred, cook_refs(references))
            testlen = comps["testlen"]
            reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]
            rows.append([testlen, reflen, *comps["guess"], *comps["correct"]])
        self.stats = np.array(rows, dtype=np.float64).reshape(len(rows), 10)
        self.order, self.n = order, len(rows)

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        totals = weights @ self.stats
        guess, correct = totals[:, 2:6], totals[:, 6:10]
        bleu = np.ones(len(totals))
        for k in range(self.order):
            bleu = bleu * (correct[:, k] + self.TINY) / (guess[:, k] + self.SMALL)
        bleu = bleu ** (1.0 / self.order)
        ratio = (totals[:, 0] + self.TINY) / (totals[:, 1] + self.SMALL)
        with np.errstate(divide="ignore"):
            brevity = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)
        return bleu * brevity


def rouge_statistic(preds: list[str], refs: list[list[str]]) -> MeanStatistic:
    """ROUGE-L: pycocoevalcap's per-document score (its own code), and the corpus mean."""
    from pycocoevalcap.rouge.rouge import Rouge

    rouge = Rouge()
    return MeanStatistic([rouge.calc_score([pred], references) for pred, references in zip(preds, refs)])


# --------------------------------------------------------------------------- METEOR


class MeteorProcess:
    """One METEOR 1.5 process, started with pycocoevalcap's jar and command line."""

    def __init__(self):
        from pycocoevalcap.meteor import meteor

        self.proc = subprocess.Popen(
            ["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=os.path.dirname(os.path.abspath(meteor.__file__)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def segment_stats(self, preds: list[str], refs: list[list[str]]) -> np.ndarray:
        """(docs, 23) sufficient statistics, one SCORE line per doc as pycocoevalcap writes it."""
        lines = ["SCORE ||| " + " ||| ".join(references) + " ||| " + pred.replace("|||", "").replace("  ", " ")
                 for pred, references in zip(preds, refs)]

        def write():  # from a thread: METEOR answers while we are still writing
            for line in lines:
                self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answers = [self.proc.stdout.readline().decode() for _ in lines]
        writer.join()
        stats = np.array([[float(x) for x in a.split()] for a in answers], dtype=np.float64)
        if stats.shape != (len(lines), METEOR_STATS):
            raise RuntimeError(f"METEOR answered {answers[:1]!r}, not {METEOR_STATS} statistics per segment")
        return stats

    def score(self, totals: np.ndarray) -> float:
        """METEOR of one set of summed statistics (an EVAL line answers its segment score, then the total)."""
        self.proc.stdin.write(("EVAL ||| " + " ".join(repr(float(x)) for x in totals) + "\n").encode())
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
        self.proc.wait()


class MeteorStatistic(Statistic):
    """METEOR of a multiset of docs: their statistics summed (as METEOR aggregates), scored by METEOR."""

    def __init__(self, stats: np.ndarray, process: MeteorProcess):
        test_matches = stats[:, [4 + 4 * i + j for i in range(4) for j in (0, 2)]].sum(axis=1)
        ref_matches = stats[:, [4 + 4 * i + j for i in range(4) for j in (1, 3)]].sum(axis=1)
        perfect = (test_matches == stats[:, 0]) & (ref_matches == stats[:, 1]) & (stats[:, 20] == 1)
        self.stats = stats.copy()
        self.stats[perfect, 20] = 0.0  # METEOR adds no chunks for a perfectly matched segment
        self.process, self.n = process, len(stats)

    def on_weights(self, weights: np.ndarray) -> np.ndarray:
        return np.array([self.process.score(totals) for totals in weights @ self.stats])


# --------------------------------------------------------------------------- one scorer per leaderboard


class CaptionScorer:
    """Caption statistics of many samples logs: the logs' captions are tokenized together, once, and
    METEOR runs in one process, whatever the number of logs and resamples."""

    def __init__(self):
        self._entries: dict[str, list[dict]] = {}
        self._tokens: dict[str, tuple[list[str], list[list[str]]]] = {}
        self._failure: str | None = None
        self._meteor: MeteorProcess | None = None
        self._meteor_stats: dict[str, np.ndarray] = {}

    def add(self, key: str, entries: list[dict]) -> None:
        """Captions of one log, tokenized (with every other log added before) at the first statistic."""
        if key not in self._tokens:
            self._entries[key] = entries

    def _tokenize_pending(self) -> None:
        pending = list(self._entries)
        if not pending or self._failure:
            return
        texts = []
        for key in pending:
            for entry in self._entries[key]:
                texts.append(entry["pred"])
                texts += [str(a) for a in entry["answer"]]
        try:
            tokens = iter(ptb_tokenize(texts))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            self._failure = f"pycocoevalcap's PTB tokenizer failed ({err})"
            return
        for key in pending:
            preds, refs = [], []
            for entry in self._entries[key]:
                preds.append(next(tokens))
                refs.append([next(tokens) for _ in entry["answer"]])
            self._tokens[key] = (preds, refs)
            del self._entries[key]

    def statistic(self, key: str, metric: str) -> Statistic | str:
        """The statistic of ``metric`` (one of CAPTION_METRICS) for the log added under ``key``, or why not."""
        if shutil.which("java") is None:
            return "no interval: Java runtime not found (pycocoevalcap's PTB tokenizer needs it)"
        self._tokenize_pending()
        if self._failure:
            return f"no interval: {self._failure}"
        preds, refs = self._tokens[key]
        if metric == "CIDEr":
            return CiderStatistic(preds, refs)
        if metric.startswith("Bleu_"):
            return BleuStatistic(preds, refs, int(metric.rpartition("_")[2]))
        if metric == "ROUGE_L":
            return rouge_statistic(preds, refs)
        if metric == "METEOR":
            if key not in self._meteor_stats:
                try:
                    self._meteor = self._meteor or MeteorProcess()
                    self._meteor_stats[key] = self._meteor.segment_stats(preds, refs)
                except (OSError, RuntimeError, ValueError) as err:
                    return f"no interval: METEOR failed ({err})"
            return MeteorStatistic(self._meteor_stats[key], self._meteor)
        raise ValueError(f"caption metric: {metric!r}; valid: {', '.join(CAPTION_METRICS)}")

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None
