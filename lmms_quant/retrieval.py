"""Image-text retrieval as lmms-eval tasks: R@1/5/10 in both directions, over the whole corpus.

lmms-eval 0.7.3 has no request type for embedding or scoring, so retrieval rides on
``generate_until`` without changing lmms-eval (docs/retrieval.md, "Retrieval design"):

* Task side (the functions the task YAMLs name): a doc is one image with its captions.
  ``doc_to_messages`` gives the model the image and one text part per caption; the task's
  ``generation_kwargs`` carry ``RETRIEVAL_KEY``, which tells a retrieval model to rank the corpus
  instead of generating. The model answers each doc with a JSON rank record; ``process_results``
  checks it and the aggregations compute recall over all records, i.e. over the whole corpus.
* Corpus ranking (model-agnostic torch code below): ITC top-k candidates computed block by block,
  so no image x text (let alone image x query x text) matrix is ever held whole; re-ranking of the
  candidates with a pair scorer (BLIP-2's ITM head); ground-truth ranks under one tie rule.
* Model side: ``model_wrappers/blip2_itm.py`` embeds the corpus and calls :func:`rank_corpus`.

Ranks are 0-based: rank r means r wrong items are placed at or above the best ground truth.
Tie rule: ties always count against the model, so corpus order never earns a hit (a model that
scores everything alike gets R@K = 0):

* a wrong item whose score equals the best ground truth's counts as placed above it;
* the shortlist of k takes ties at its boundary by the lower corpus index (so the same scores always
  give the same shortlist), and a wrong item left off only by that index counts as placed above a
  shortlisted truth;
* items off the shortlist are not re-ranked: they score -inf, below every scored item; NaN scores
  count as -inf.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

IMAGE_FIELD = "image"
CAPTIONS_FIELD = "text"
RETRIEVAL_KEY = "lmms_quant_retrieval"  # in a task's generation_kwargs: "rank, don't generate"
PROTOCOL = "image_text"  # the value of RETRIEVAL_KEY, and the "protocol" field of every rank record
RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")  # image→text (text retrieval, "TR"), text→image (image retrieval, "IR")
METRICS = (
    *(f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_KS),
    *(f"{d}_r_mean" for d in DIRECTIONS),
    "r_mean",
)
# Elements of the image x query x text similarity block held at once (2**24 float32 = 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 2**24

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Task side: what the YAMLs name.
# ---------------------------------------------------------------------------------------------


def doc_captions(doc: dict) -> list[str]:
    """The doc's captions (its ground-truth texts), checked: a non-empty list of non-empty strings."""
    if CAPTIONS_FIELD not in doc:
        raise KeyError(
            f"retrieval doc: no {CAPTIONS_FIELD!r} column (doc keys: {sorted(doc)}); the schema is "
            f"{{{IMAGE_FIELD!r}: image, {CAPTIONS_FIELD!r}: list of captions}}"
        )
    captions = doc[CAPTIONS_FIELD]
    if (
        not isinstance(captions, (list, tuple))
        or not captions
        or not all(isinstance(c, str) and c.strip() for c in captions)
    ):
        raise ValueError(
            f"retrieval doc: {CAPTIONS_FIELD!r} is {captions!r}; valid: a non-empty list of non-empty strings"
        )
    return list(captions)


def doc_to_visual(doc: dict) -> list:
    if IMAGE_FIELD not in doc:
        raise KeyError(f"retrieval doc: no {IMAGE_FIELD!r} column (doc keys: {sorted(doc)})")
    return [doc[IMAGE_FIELD].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The captions one per line: what lmms-eval logs as the doc's input."""
    return "\n".join(doc_captions(doc))


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """One user turn: the image, then one text part per caption (the texts to be ranked)."""
    content = [{"type": "image", "url": image} for image in doc_to_visual(doc)]
    content += [{"type": "text", "text": caption} for caption in doc_captions(doc)]
    return [{"role": "user", "content": content}]


def parse_rank_record(response: str) -> dict:
    """A model's answer to one retrieval doc, checked; a clear error for anything else."""
    try:
        record = json.loads(response)
    except (TypeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("protocol") != PROTOCOL:
        raise ValueError(
            f"retrieval task: the model answered {str(response)[:200]!r}, not a rank record of protocol "
            f"{PROTOCOL!r}; retrieval tasks need a retrieval model (--model quant_blip2_itm)"
        )
    for key in ("i2t_rank", "n_images", "n_texts"):
        if not isinstance(record.get(key), int) or record[key] < 0:
            raise ValueError(f"rank record: {key!r} is {record.get(key)!r}; valid: an int >= 0")
    ranks = record.get("t2i_ranks")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, int) and r >= 0 for r in ranks):
        raise ValueError(f"rank record: 't2i_ranks' is {ranks!r}; valid: a non-empty list of ints >= 0")
    return record


def process_results(doc: dict, results: Sequence[str]) -> dict[str, dict]:
    """Every metric gets the doc's rank record; the aggregations turn all records into recalls."""
    record = parse_rank_record(results[0])
    n_captions = len(doc_captions(doc))
    if len(record["t2i_ranks"]) != n_captions:
        raise ValueError(
            f"rank record: {len(record['t2i_ranks'])} text→image ranks for a doc with {n_captions} captions"
        )
    return {metric: record for metric in METRICS}


def corpus_ranks(records: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(image→text ranks, text→image ranks) of all records, checked to be exactly one whole corpus."""
    if not records:
        raise ValueError("retrieval aggregation: no rank records")
    sizes = {(r["n_images"], r["n_texts"]) for r in records}
    i2t = [r["i2t_rank"] for r in records]
    t2i = [rank for r in records for rank in r["t2i_ranks"]]
    if len(sizes) != 1 or sizes != {(len(i2t), len(t2i))}:
        raise ValueError(
            f"retrieval aggregation: {len(i2t)} records with {len(t2i)} captions, but the model ranked "
            f"corpora of (images, texts) = {sorted(sizes)}; the records must cover exactly the ranked "
            "corpus (was it split across processes?)"
        )
    return i2t, t2i


def recall_at_k(ranks: Sequence[int], k: int) -> float:
    """Percentage of queries whose best ground truth has rank < k."""
    if not ranks:
        raise ValueError("recall_at_k: no ranks")
    return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


def recall_metrics(i2t_ranks: Sequence[int], t2i_ranks: Sequence[int]) -> dict[str, float]:
    """All METRICS: R@K per direction, each direction's mean over K, and the mean of the two means."""
    out = {}
    for direction, ranks in zip(DIRECTIONS, (i2t_ranks, t2i_ranks)):
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = recall_at_k(ranks, k)
        out[f"{direction}_r_mean"] = sum(out[f"{direction}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["i2t_r_mean"] + out["t2i_r_mean"]) / 2
    return out


def _aggregation(metric: str) -> Callable[[Sequence[dict]], float]:
    def aggregate(records: Sequence[dict]) -> float:
        return recall_metrics(*corpus_ranks(records))[metric]

    aggregate.__name__ = aggregate.__qualname__ = metric
    aggregate.__doc__ = f"lmms-eval aggregation: {metric} over the whole corpus of rank records."
    return aggregate


i2t_r1 = _aggregation("i2t_r1")
i2t_r5 = _aggregation("i2t_r5")
i2t_r10 = _aggregation("i2t_r10")
i2t_r_mean = _aggregation("i2t_r_mean")
t2i_r1 = _aggregation("t2i_r1")
t2i_r5 = _aggregation("t2i_r5")
t2i_r10 = _aggregation("t2i_r10")
t2i_r_mean = _aggregation("t2i_r_mean")
r_mean = _aggregation("r_mean")
assert all(globals()[m].__name__ == m for m in METRICS)


# ---------------------------------------------------------------------------------------------
# Corpus ranking: ITC candidates in blocks, re-ranking, ground-truth ranks.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shortlist:
    """One direction's candidates: per query, the k best by ITC (ties: lower corpus index first).

    ids / itc: (queries, k) corpus indices and ITC scores, best first. scores: what the candidates
    are ranked by (ITC, or ITC + ITM after :func:`rerank`). tied_out: (queries,) wrong items left
    out of the shortlist although their ITC equals the k-th best (only the index decided): the tie
    rule counts them against the truth. Every item not on the shortlist scores -inf.
    """

    ids: torch.Tensor
    itc: torch.Tensor
    tied_out: torch.Tensor
    scores: torch.Tensor
    reranked: bool = False


@dataclass(frozen=True)
class Candidates:
    i2t: Shortlist  # queries = images, items = texts
    t2i: Shortlist  # queries = texts, items = images


@dataclass(frozen=True)
class CorpusRanks:
    """0-based rank of the best ground truth of every image (i2t) and of every caption (t2i)."""

    i2t: list[int]
    t2i: list[int]
    captions_per_image: list[int]

    def metrics(self) -> dict[str, float]:
        return recall_metrics(self.i2t, self.t2i)

    def records(self) -> list[dict]:
        """One rank record per image (= per doc), in corpus order: what the model answers."""
        n_images, n_texts = len(self.i2t), len(self.t2i)
        records, start = [], 0
        for image, n_captions in enumerate(self.captions_per_image):
            records.append(
                {
                    "protocol": PROTOCOL,
                    "i2t_rank": self.i2t[image],
                    "t2i_ranks": self.t2i[start : start + n_captions],
                    "n_images": n_images,
                    "n_texts": n_texts,
                }
            )
            start += n_captions
        return records


def text_to_image_index(captions_per_image: Sequence[int]) -> torch.Tensor:
    """Image index of every caption, captions laid out image after image."""
    counts = torch.as_tensor(list(captions_per_image), dtype=torch.long)
    if counts.numel() == 0 or bool((counts < 1).any()):
        raise ValueError(f"captions_per_image: got {list(captions_per_image)}; valid: a non-empty list of ints >= 1")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(images, texts) similarity: the best query of each image (BLIP-2 ITC), float32; NaN becomes -inf.

    image_feats: (images, queries, dim) or (images, dim); text_feats: (texts, dim).
    """
    if image_feats.dim() == 2:
        image_feats = image_feats.unsqueeze(1)
    n_images, n_queries, dim = image_feats.shape
    sim = (image_feats.reshape(n_images * n_queries, dim) @ text_feats.T).reshape(n_images, n_queries, -1)
    return torch.nan_to_num(sim.amax(dim=1).float(), nan=NEG_INF)


class _RunningTop:
    """Per query (row), the k best items seen so far by (score desc, index asc), fed block by block
    with items in increasing index order, plus the count of wrong items dropped at a tie with the
    k-th best score."""

    def __init__(self, n_queries: int, k: int, device):
        self.k = k
        self.scores = torch.empty((n_queries, 0), dtype=torch.float32, device=device)
        self.ids = torch.empty((n_queries, 0), dtype=torch.long, device=device)
        self.truth = torch.empty((n_queries, 0), dtype=torch.bool, device=device)
        self.tied_out = torch.zeros(n_queries, dtype=torch.long, device=device)

    def add(self, scores: torch.Tensor, ids: torch.Tensor, truth: torch.Tensor) -> None:
        was_full = self.scores.shape[1] == self.k
        old_boundary = self.scores[:, -1] if was_full else None
        scores = torch.cat([self.scores, scores], dim=1)
        ids = torch.cat([self.ids, ids], dim=1)
        truth = torch.cat([self.truth, truth], dim=1)
        # Kept items have lower indices than new ones and are already in (score desc, index asc)
        # order, so a stable descending sort keeps that order: ties go to the lower corpus index.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        keep, drop = order[:, : self.k], order[:, self.k :]
        self.scores, self.ids, self.truth = scores.gather(1, keep), ids.gather(1, keep), truth.gather(1, keep)
        if drop.shape[1] == 0:
            return
        boundary = self.scores[:, -1]
        dropped_tied = (scores.gather(1, drop) == boundary[:, None]) & ~truth.gather(1, drop)
        carried = torch.zeros_like(self.tied_out)
        if was_full:  # items dropped earlier at the same boundary are still tied with it
            carried = torch.where(old_boundary == boundary, self.tied_out, carried)
        self.tied_out = carried + dropped_tied.sum(dim=1)

    def shortlist(self) -> Shortlist:
        return Shortlist(self.ids, self.scores, self.tied_out, self.scores)


def _block_shape(n_images: int, n_queries: int, n_texts: int, block_elements: int) -> tuple[int, int]:
    if not isinstance(block_elements, int) or block_elements < 1:
        raise ValueError(f"block_elements: got {block_elements!r}; valid: an int >= 1")
    texts = min(n_texts, max(1, block_elements // n_queries))
    images = min(n_images, max(1, block_elements // (n_queries * texts)))
    return images, texts


def itc_candidates(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    captions_per_image: Sequence[int],
    k: int,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Candidates:
    """The k best texts of every image and the k best images of every text by ITC similarity.

    The similarity is computed in blocks of at most ``block_elements`` image x query x text entries
    (at least one image x one text), merged into running top-k lists in both directions, so memory
    is O(block + k x (images + texts)), never O(images x texts). Ground truth (texts laid out image
    after image) is used only to count the tie-decided wrong items, never to choose candidates.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: got {k!r}; valid: an int >= 1")
    if image_feats.dim() == 2:
        image_feats = image_feats.unsqueeze(1)
    if image_feats.dim() != 3 or text_feats.dim() != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(
            f"features: image {tuple(image_feats.shape)}, text {tuple(text_feats.shape)}; valid: image "
            "(images, queries, dim) or (images, dim), text (texts, dim), same dim"
        )
    n_images, n_queries, _ = image_feats.shape
    n_texts = text_feats.shape[0]
    device = image_feats.device
    text_image = text_to_image_index(captions_per_image).to(device)
    if len(captions_per_image) != n_images or len(text_image) != n_texts:
        raise ValueError(
            f"features for {n_images} images and {n_texts} texts; captions_per_image describes "
            f"{len(captions_per_image)} images and {len(text_image)} texts"
        )
    block_images, block_texts = _block_shape(n_images, n_queries, n_texts, block_elements)
    text_starts = range(0, n_texts, block_texts)
    # One running top-k per text block (its texts are the rows); images arrive in index order.
    t2i_top = {t0: _RunningTop(min(block_texts, n_texts - t0), k, device) for t0 in text_starts}
    i2t_parts = []
    for i0 in range(0, n_images, block_images):
        i1 = min(n_images, i0 + block_images)
        image_ids = torch.arange(i0, i1, device=device)
        i2t_top = _RunningTop(i1 - i0, k, device)
        for t0 in text_starts:
            t1 = min(n_texts, t0 + block_texts)
            sim = itc_similarity(image_feats[i0:i1], text_feats[t0:t1])
            truth = text_image[t0:t1][None, :] == image_ids[:, None]  # (block images, block texts)
            text_ids = torch.arange(t0, t1, device=device)
            i2t_top.add(sim, text_ids.expand(i1 - i0, -1), truth)
            t2i_top[t0].add(sim.T, image_ids.expand(t1 - t0, -1), truth.T)
        i2t_parts.append(i2t_top.shortlist())
    t2i_parts = [t2i_top[t0].shortlist() for t0 in text_starts]

    def joined(parts: list[Shortlist]) -> Shortlist:
        ids, itc, tied_out = (torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "itc", "tied_out"))
        return Shortlist(ids, itc, tied_out, itc)

    return Candidates(joined(i2t_parts), joined(t2i_parts))


PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rerank(candidates: Candidates, pair_scorer: PairScorer, n_texts: int) -> Candidates:
    """Shortlists re-scored ITC + pair_scorer(image, text), as BLIP-2 re-ranks with its ITM head.

    Each distinct (image, text) pair is scored once, whichever direction shortlisted it, so a pair
    has the same score in both directions. ``pair_scorer(images, texts)`` gets the pairs as two index
    tensors sorted by image, then text (so a scorer can encode each image once), and returns one
    score per pair.
    """
    i2t, t2i = candidates.i2t, candidates.t2i
    device = i2t.ids.device
    i2t_images = torch.arange(i2t.ids.shape[0], device=device)[:, None].expand_as(i2t.ids)
    t2i_texts = torch.arange(t2i.ids.shape[0], device=device)[:, None].expand_as(t2i.ids)
    keys = torch.cat([(i2t_images * n_texts + i2t.ids).flatten(), (t2i.ids * n_texts + t2i_texts).flatten()])
    pairs, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    scores = pair_scorer(pairs // n_texts, pairs % n_texts)
    if not isinstance(scores, torch.Tensor) or scores.shape != pairs.shape:
        raise ValueError(
            f"pair_scorer: returned {getattr(scores, 'shape', type(scores))} for {len(pairs)} pairs; "
            "valid: a tensor of one score per pair"
        )
    scores = scores.to(device=device, dtype=torch.float32)
    n_i2t = i2t.ids.numel()

    def rescored(shortlist: Shortlist, pair_scores: torch.Tensor) -> Shortlist:
        # +inf (a broken head) plus -inf would be NaN: count it, like every NaN, as -inf.
        final = torch.nan_to_num(shortlist.itc + pair_scores.reshape(shortlist.itc.shape), nan=NEG_INF)
        return Shortlist(shortlist.ids, shortlist.itc, shortlist.tied_out, final, reranked=True)

    return Candidates(rescored(i2t, scores[inverse[:n_i2t]]), rescored(t2i, scores[inverse[n_i2t:]]))


def _best_truth_ranks(shortlist: Shortlist, is_truth: torch.Tensor, n_wrong: torch.Tensor) -> torch.Tensor:
    scores = torch.nan_to_num(shortlist.scores.float(), nan=NEG_INF)
    best_truth = torch.where(is_truth, scores, torch.full_like(scores, NEG_INF)).amax(dim=1)
    placed_above = (~is_truth & (scores >= best_truth[:, None])).sum(dim=1)
    # Wrong items the index tie-break left off the shortlist: after re-ranking their score is
    # unknown, so they count against the truth (unless their ITC is -inf, which stays -inf); without
    # re-ranking they score the k-th best ITC, which ties or beats the truth only if it equals it.
    boundary = shortlist.itc[:, -1]
    counts = boundary > NEG_INF if shortlist.reranked else best_truth <= boundary
    placed_above = placed_above + torch.where(counts, shortlist.tied_out, torch.zeros_like(shortlist.tied_out))
    # No truth scored: every wrong item (scored, or unscored = -inf) ties or beats it.
    return torch.where(best_truth == NEG_INF, n_wrong, placed_above)


def ground_truth_ranks(candidates: Candidates, captions_per_image: Sequence[int]) -> CorpusRanks:
    """Rank of the best ground truth per query under the module's tie rule (see the docstring)."""
    device = candidates.i2t.ids.device
    text_image = text_to_image_index(captions_per_image).to(device)
    n_images, n_texts = len(captions_per_image), len(text_image)
    if candidates.i2t.ids.shape[0] != n_images or candidates.t2i.ids.shape[0] != n_texts:
        raise ValueError(
            f"candidates cover {candidates.i2t.ids.shape[0]} images and {candidates.t2i.ids.shape[0]} texts; "
            f"the corpus has {n_images} images and {n_texts} texts"
        )
    images = torch.arange(n_images, device=device)
    captions = torch.bincount(text_image, minlength=n_images)
    i2t = _best_truth_ranks(candidates.i2t, text_image[candidates.i2t.ids] == images[:, None], n_texts - captions)
    t2i = _best_truth_ranks(
        candidates.t2i,
        candidates.t2i.ids == text_image[:, None],
        torch.full((n_texts,), n_images - 1, device=device),
    )
    return CorpusRanks(i2t.cpu().tolist(), t2i.cpu().tolist(), list(captions_per_image))


def rank_corpus(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    captions_per_image: Sequence[int],
    k: int,
    pair_scorer: PairScorer | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> CorpusRanks:
    """ITC shortlists of k in both directions, optionally re-ranked by ``pair_scorer``, then ranks.

    Texts are laid out image after image (``captions_per_image``). Without re-ranking the ranks are
    the ITC ranks exactly up to k (a truth off the shortlist has k wrong items at or above it, and
    gets the worst rank).
    """
    if not isinstance(k, int) or k < max(RECALL_KS):
        raise ValueError(
            f"k: got {k!r}; valid: an int >= {max(RECALL_KS)} (R@{max(RECALL_KS)} needs that many candidates)"
        )
    candidates = itc_candidates(image_feats, text_feats, captions_per_image, k, block_elements)
    if pair_scorer is not None:
        candidates = rerank(candidates, pair_scorer, text_feats.shape[0])
    return ground_truth_ranks(candidates, captions_per_image)
