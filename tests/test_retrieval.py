"""Image-text retrieval: ranking rules, and R@K through lmms-eval's task pipeline equal to a brute force.

The brute force is written independently of lmms_quant.retrieval: full score matrices from the
transformers forward pass, candidates by sorting whole rows/columns, ranks by sorting with the tie
rule spelt out (on equal scores a wrong candidate goes first).
"""

import json
import random
from pathlib import Path

import pytest
import torch

from lmms_quant import retrieval
from lmms_quant.retrieval import Candidates, Shortlist

NEG_INF = float("-inf")


def recall(ranks, k):
    return 100.0 * sum(r < k for r in ranks) / len(ranks)


def brute_force_rank(scores, truths):
    """0-based position of the first ground truth when sorted by score, wrong candidates first on ties."""
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], c in truths))
    return next(pos for pos, c in enumerate(order) if c in truths)


def brute_force_ranks(itc, pair_scores, captions_per_image, k, reranked=True):
    """(i2t ranks, t2i ranks) from dense (images, texts) ITC and pair-score matrices.

    Shortlist: the k best by ITC (ties: lower index). Shortlisted items score ITC + pair score
    (or ITC alone), NaN as -inf. Off the shortlist: -inf, except wrong items that tie the k-th ITC
    (left off by index alone), which score +inf after re-ranking (unknown, counted against the
    truth) or their ITC without it.
    """
    text_image = [i for i, n in enumerate(captions_per_image) for _ in range(n)]
    n_images, n_texts = len(captions_per_image), len(text_image)

    def scored(itc_row, pair_row, truths):
        itc_row = [NEG_INF if s != s else s for s in itc_row]
        order = sorted(range(len(itc_row)), key=lambda c: (-itc_row[c], c))
        shortlist, off = order[:k], order[k:]
        boundary = itc_row[shortlist[-1]]
        out = [NEG_INF] * len(itc_row)
        for c in shortlist:
            value = itc_row[c] + pair_row[c] if reranked else itc_row[c]
            out[c] = NEG_INF if value != value else value
        for c in off:
            if c not in truths and itc_row[c] == boundary and boundary > NEG_INF:
                out[c] = float("inf") if reranked else boundary
        return out

    i2t = []
    for i in range(n_images):
        truths = {t for t in range(n_texts) if text_image[t] == i}
        i2t.append(brute_force_rank(scored(itc[i], pair_scores[i], truths), truths))
    t2i = []
    for t in range(n_texts):
        column = [itc[i][t] for i in range(n_images)]
        pairs = [pair_scores[i][t] for i in range(n_images)]
        t2i.append(brute_force_rank(scored(column, pairs, {text_image[t]}), {text_image[t]}))
    return i2t, t2i


def integer_features(n, dim, queries=None, seed=0, levels=3):
    """Small-integer features: every dot product is exact in float32, so equal rows tie exactly."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, dim) if queries is None else (n, queries, dim)
    return torch.randint(0, levels, shape, generator=g).float()


# ----------------------------------------------------------------------------- metrics and tie rule


def test_recall_metrics_from_known_ranks():
    metrics = retrieval.recall_metrics([0, 1, 5, 10], [0, 0, 3, 4, 9, 20])
    assert metrics["i2t_r1"] == 25.0 and metrics["i2t_r5"] == 50.0 and metrics["i2t_r10"] == 75.0
    assert metrics["t2i_r1"] == pytest.approx(100 / 3) and metrics["t2i_r5"] == pytest.approx(400 / 6)
    assert metrics["t2i_r10"] == pytest.approx(500 / 6)
    assert metrics["i2t_r_mean"] == pytest.approx(50.0)
    assert metrics["r_mean"] == pytest.approx((50.0 + (100 / 3 + 400 / 6 + 500 / 6) / 3) / 2)
    assert set(metrics) == set(retrieval.METRICS)


def test_a_model_that_scores_everything_alike_never_hits():
    # 12 images x 2 captions, all similarities equal: ties count against the model, whatever the order.
    captions_per_image = [2] * 12
    ranks = retrieval.rank_corpus(torch.ones(12, 4, 8), torch.ones(24, 8), captions_per_image, k=10)
    assert ranks.i2t == [24 - 2] * 12  # every wrong caption ties with the truth
    assert ranks.t2i == [12 - 1] * 24
    assert all(value == 0.0 for value in ranks.metrics().values())


def test_ties_with_wrong_candidates_count_against_the_truth():
    # Image 0 (captions: texts 0 and 1): best truth 0.5 tied by text 2, beaten by text 3.
    # Image 1 (texts 2 and 3): best truth 0.3, both wrong texts lower.
    scores = torch.tensor([[0.5, 0.2, 0.5, 0.9], [0.1, 0.1, 0.3, 0.2]])
    i2t = Shortlist(torch.tensor([[0, 1, 2, 3]] * 2), scores, torch.tensor([0, 0]), scores)
    t2i_scores = torch.ones(4, 1)
    t2i = Shortlist(torch.zeros(4, 1, dtype=torch.long), t2i_scores, torch.zeros(4, dtype=torch.long), t2i_scores)
    ranks = retrieval.ground_truth_ranks(Candidates(i2t, t2i), [2, 2])
    assert ranks.i2t == [2, 0]
    # Only image 0 is shortlisted for each text: texts 0/1 find it first, texts 2/3 (image 1's) never score it.
    assert ranks.t2i == [0, 0, 1, 1]


def test_wrong_items_left_off_the_shortlist_by_index_count_against_the_truth():
    # Image 0's caption (text 0) scores 1.0; the 11 wrong texts all tie at 0.5, so index alone picks
    # 9 of them for a shortlist of 10 and leaves 2 off.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0]] + [[0.5, 0.0]] * 11 + [[0.0, 1.0]])
    cands = retrieval.itc_candidates(images, texts, [1, 12], k=10)
    assert cands.i2t.tied_out.tolist()[0] == 2
    # Without re-ranking the truth's ITC 1.0 is above the tie, which then costs nothing.
    assert retrieval.ground_truth_ranks(cands, [1, 12]).i2t[0] == 0
    # Re-ranked, the 2 left-off items' scores are unknown: they count as placed above the truth.
    reranked = retrieval.rerank(cands, lambda i, t: torch.zeros(len(i)), n_texts=13)
    assert retrieval.ground_truth_ranks(reranked, [1, 12]).i2t[0] == 2


def test_candidate_selection_breaks_score_ties_by_lower_index():
    image_feats = torch.ones(3, 1, 2)
    text_feats = torch.ones(5, 2)
    cands = retrieval.itc_candidates(image_feats, text_feats, [2, 2, 1], k=2, block_elements=1)
    assert cands.i2t.ids.tolist() == [[0, 1]] * 3
    assert cands.t2i.ids.tolist() == [[0, 1]] * 5


@pytest.mark.parametrize("block_elements", [1, 7, 40, 2**24])
def test_blockwise_candidates_equal_dense_top_k(block_elements):
    images = integer_features(9, 4, queries=3, seed=1)
    images[5] = images[2]  # exact ties between two images
    texts = integer_features(23, 4, seed=2)
    texts[7] = texts[3]
    dense = (images @ texts.T).amax(dim=1)  # (images, texts)
    k = 6
    captions_per_image = [3, 1, 2, 4, 2, 3, 1, 5, 2]
    cands = retrieval.itc_candidates(images, texts, captions_per_image, k=k, block_elements=block_elements)
    text_image = [i for i, n in enumerate(captions_per_image) for _ in range(n)]
    for i in range(9):
        order = sorted(range(23), key=lambda t: (-dense[i, t].item(), t))
        assert cands.i2t.ids[i].tolist() == order[:k]
        assert cands.i2t.itc[i].tolist() == [dense[i, t].item() for t in order[:k]]
        boundary = dense[i, order[k - 1]].item()
        assert cands.i2t.tied_out[i].item() == sum(
            dense[i, t].item() == boundary and text_image[t] != i for t in order[k:]
        )
    for t in range(23):
        order = sorted(range(9), key=lambda i: (-dense[i, t].item(), i))
        assert cands.t2i.ids[t].tolist() == order[:k]
        assert cands.t2i.itc[t].tolist() == [dense[i, t].item() for i in order[:k]]
        boundary = dense[order[k - 1], t].item()
        assert cands.t2i.tied_out[t].item() == sum(
            dense[i, t].item() == boundary and i != text_image[t] for i in order[k:]
        )


@pytest.mark.parametrize("k", [10, 13, 200])
def test_rank_corpus_equals_brute_force(k):
    rng = random.Random(k)
    captions_per_image = [rng.choice([1, 2, 3]) for _ in range(14)]
    n_texts = sum(captions_per_image)
    images = integer_features(14, 5, queries=2, seed=3)
    images[9] = images[4]
    texts = integer_features(n_texts, 5, seed=4)
    texts[1] = texts[0]
    # A pair scorer with ties and a few NaNs (a broken head): NaN must count as -inf.
    table = torch.randint(-2, 3, (14, n_texts), generator=torch.Generator().manual_seed(5)).float()
    table[3, :4] = float("nan")
    seen = []

    def pair_scorer(img, txt):
        seen.append(list(zip(img.tolist(), txt.tolist())))
        return table[img, txt]

    ranks = retrieval.rank_corpus(images, texts, captions_per_image, k=k, pair_scorer=pair_scorer, block_elements=16)
    dense = (images @ texts.T).amax(dim=1)
    i2t, t2i = brute_force_ranks(dense.tolist(), table.tolist(), captions_per_image, k)
    assert ranks.i2t == i2t and ranks.t2i == t2i
    expected = {f"i2t_r{kk}": recall(i2t, kk) for kk in (1, 5, 10)} | {f"t2i_r{kk}": recall(t2i, kk) for kk in (1, 5, 10)}
    assert {m: v for m, v in ranks.metrics().items() if m in expected} == pytest.approx(expected)
    # Each distinct pair is scored once, pairs sorted by image then text.
    (pairs,) = seen
    assert pairs == sorted(set(pairs))


@pytest.mark.parametrize("k", [10, 30])
def test_itc_only_ranks_equal_brute_force(k):
    captions_per_image = [2] * 11
    images, texts = integer_features(11, 4, seed=6), integer_features(22, 4, seed=7)
    ranks = retrieval.rank_corpus(images, texts, captions_per_image, k=k)
    dense = (images @ texts.T).tolist()
    zeros = [[0.0] * 22 for _ in range(11)]
    assert (ranks.i2t, ranks.t2i) == brute_force_ranks(dense, zeros, captions_per_image, k, reranked=False)
    # Up to k these are the plain ITC ranks of the whole matrix (ties against the truth).
    full = brute_force_ranks(dense, zeros, captions_per_image, 10**6, reranked=False)
    for short, exact in zip(ranks.i2t + ranks.t2i, full[0] + full[1]):
        assert short == exact or (short >= k and exact >= k)


def test_records_carry_each_doc_its_ranks_and_the_corpus_size():
    ranks = retrieval.CorpusRanks(i2t=[0, 3], t2i=[1, 0, 2], captions_per_image=[2, 1])
    records = ranks.records()
    assert [r["t2i_ranks"] for r in records] == [[1, 0], [2]]
    assert all(r["n_images"] == 2 and r["n_texts"] == 3 for r in records)
    assert retrieval.corpus_ranks(records) == ([0, 3], [1, 0, 2])


def test_bad_inputs_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"k: got 5; valid: an int >= 10"):
        retrieval.rank_corpus(torch.ones(12, 2), torch.ones(12, 2), [1] * 12, k=5)
    doc = {"image": None, "text": ["a red circle"]}
    with pytest.raises(ValueError, match="quant_blip2_itm"):
        retrieval.process_results(doc, ["a red circle"])  # a generative model's answer
    with pytest.raises(KeyError, match="'text'"):
        retrieval.doc_captions({"image": None, "caption": ["x"]})
    records = retrieval.CorpusRanks(i2t=[0, 3], t2i=[1, 0, 2], captions_per_image=[2, 1]).records()
    with pytest.raises(ValueError, match="split across processes"):
        retrieval.i2t_r1(records[:1])  # half a corpus
    wrong_count = json.dumps(records[1])
    with pytest.raises(ValueError, match="1 text→image ranks for a doc with 2 captions"):
        retrieval.process_results({"image": None, "text": ["a", "b"]}, [wrong_count])


# ----------------------------------------------------------------------------- the model and the task pipeline

TASK = "flickr30k_retrieval_local"
N_SCENES = 12  # + one duplicate doc: 13 images, 65 captions


@pytest.fixture(scope="module")
def sharp_itm(tiny_checkpoints, tmp_path_factory):
    """The tiny ITM checkpoint with its random weights scaled up: scores then depend strongly on the
    input, so distinct scores lie far apart compared with float noise and rankings are stable."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    base = tiny_checkpoints["blip2_itm"]
    model = Blip2ForImageTextRetrieval.from_pretrained(base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embeddings" not in name:
                param.mul_(8.0)
        model.query_tokens.mul_(20.0)
    out = tmp_path_factory.mktemp("sharp_itm")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(include_path, parquet file, captions per doc): 12 hard-negative scenes plus doc 12 = a copy of
    doc 1 (image and captions), so scores tie exactly in both directions."""
    from lmms_quant.fixtures.retrieval_data import retrieval_captions, retrieval_scenes, write_retrieval_parquet
    from lmms_quant.tasks_path import render_tasks

    scenes = retrieval_scenes(N_SCENES, seed=0, stream="test")
    scenes.append(scenes[1])
    root = tmp_path_factory.mktemp("retrieval_data")
    parquet = write_retrieval_parquet(scenes, root / "flickr30k_retrieval" / "test.parquet")
    rendered = render_tasks(root, tmp_path_factory.mktemp("retrieval_tasks") / "rendered")
    # Only the retrieval task files on the include path: the test depends on no other task YAML.
    include = tmp_path_factory.mktemp("retrieval_include")
    for name in ("flickr30k_retrieval.yaml", "flickr30k_retrieval_local.yaml"):
        (include / name).write_text((rendered / name).read_text())
    return include, parquet, [retrieval_captions(s) for s in scenes]


@pytest.fixture(scope="module")
def dense_scores(sharp_itm, corpus):
    """Dense ITC and ITM-match matrices (images, texts) of the whole test corpus."""
    return brute_force_scores(sharp_itm, corpus[1])


def brute_force_scores(checkpoint, corpus_dir):
    """Dense ITC and ITM-match matrices (images, texts) from the transformers forward pass, one batch each."""
    import datasets
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    rows = datasets.load_dataset("parquet", data_files={"test": str(corpus_dir)})["test"]
    images = [row["image"].convert("RGB") for row in rows]
    captions = [c for row in rows for c in row["text"]]
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Blip2ForImageTextRetrieval.from_pretrained(checkpoint).eval()
    pixels = processor(images=images, return_tensors="pt").pixel_values
    text = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    n_i, n_t = len(images), len(captions)
    with torch.no_grad():
        itc = model(pixel_values=pixels, **text, use_image_text_matching_head=False).logits_per_image
        image_of_pair = torch.arange(n_i).repeat_interleave(n_t)
        text_of_pair = torch.arange(n_t).repeat(n_i)
        itm = model(
            pixel_values=pixels[image_of_pair],
            input_ids=text.input_ids[text_of_pair],
            attention_mask=text.attention_mask[text_of_pair],
            use_image_text_matching_head=True,
        ).logits_per_image[:, 1].reshape(n_i, n_t)
    return itc, itm


def run_task(checkpoint, include, model_args="", batch_size=16, limit=None):
    """The retrieval task through lmms-eval's evaluator (task building, process_results, aggregation)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = simple_evaluate(
        model="quant_blip2_itm",
        model_args=f"pretrained={checkpoint},dtype=float32{model_args}",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(include), model_name="quant_blip2_itm"),
        batch_size=batch_size,
        limit=limit,
        log_samples=True,
    )
    results = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    records = [json.loads(sample["filtered_resps"][0]) for sample in samples]
    return {m: results[f"{m},none"] for m in retrieval.METRICS}, records


def assert_pipeline_equals(metrics, records, i2t, t2i):
    assert [r["i2t_rank"] for r in records] == i2t
    assert [rank for r in records for rank in r["t2i_ranks"]] == t2i
    expected = {f"i2t_r{k}": recall(i2t, k) for k in (1, 5, 10)} | {f"t2i_r{k}": recall(t2i, k) for k in (1, 5, 10)}
    for metric, value in expected.items():
        assert metrics[metric] == pytest.approx(value)
    assert metrics["r_mean"] == pytest.approx(sum(expected.values()) / 6)


def test_feature_passes_equal_the_transformers_forward(sharp_itm, corpus):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    from lmms_quant.model_wrappers.blip2_itm import (
        itc_image_features, itc_text_features, itm_match_logits, vit_embeddings,
    )

    _, _, captions = corpus
    processor = AutoProcessor.from_pretrained(sharp_itm)
    model = Blip2ForImageTextRetrieval.from_pretrained(sharp_itm).eval()
    from lmms_quant.fixtures import shapes
    from lmms_quant.fixtures.retrieval_data import retrieval_scenes

    images = [shapes.render(s) for s in retrieval_scenes(3, seed=1)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    text = processor.tokenizer(captions[0] + captions[5], padding="longest", return_tensors="pt")
    with torch.no_grad():
        vit = vit_embeddings(model, pixels)
        itc = (itc_image_features(model, vit) @ itc_text_features(model, text.input_ids, text.attention_mask).T).amax(1)
        expected_itc = model(pixel_values=pixels, **text, use_image_text_matching_head=False).logits_per_image
        pair_image, pair_text = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 3, 6, 9])
        itm = itm_match_logits(model, vit[pair_image], text.input_ids[pair_text], text.attention_mask[pair_text])
        expected_itm = model(
            pixel_values=pixels[pair_image], input_ids=text.input_ids[pair_text],
            attention_mask=text.attention_mask[pair_text], use_image_text_matching_head=True,
        ).logits_per_image[:, 1]
    torch.testing.assert_close(itc, expected_itc, rtol=0, atol=1e-6)
    torch.testing.assert_close(itm, expected_itm, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k", [10, 128])  # a shortlist smaller than both sides / the whole corpus
def test_task_pipeline_equals_brute_force_ranking(top_k, sharp_itm, corpus, dense_scores):
    include, _, captions = corpus
    captions_per_image = [len(c) for c in captions]
    itc, itm = dense_scores
    # Preconditions that make the comparison meaningful: the duplicate doc ties exactly, and every
    # other pair of scores of one query lies far apart compared with float noise.
    assert torch.equal(itc[1], itc[12]) and torch.equal(itm[1], itm[12])
    final = (itc + itm).tolist()
    for row in final + [list(col) for col in zip(*final)]:
        distinct = sorted(set(row))
        assert min(b - a for a, b in zip(distinct, distinct[1:])) > 1e-6  # batching noise: ~1e-7
    i2t, t2i = brute_force_ranks(itc.tolist(), itm.tolist(), captions_per_image, top_k)
    # All 13 images in one encoder batch and all 65 captions in one text batch, as in the brute force:
    # the duplicate's scores then tie exactly here too (ITM pairs still go in batches of 32).
    metrics, records = run_task(sharp_itm, include, f",itm_top_k={top_k},itm_batch_size=32", batch_size=16)

    assert_pipeline_equals(metrics, records, i2t, t2i)
    # The duplicate's captions tie their own image with its copy: never a hit at R@1, in either direction.
    assert min(i2t[1], i2t[12]) >= 1 and min(t2i[5:10] + t2i[60:65]) >= 1
    assert 0 < metrics["t2i_r1"] < 100 and 0 < metrics["i2t_r10"] < 100  # ranks vary: the test can tell


def test_limit_makes_the_first_docs_the_corpus_whatever_the_batching(sharp_itm, corpus, dense_scores):
    include, _, captions = corpus
    itc, itm = dense_scores
    n = 12  # the first 12 docs: the duplicate (doc 12) is not part of this corpus
    i2t, t2i = brute_force_ranks(
        itc[:n, : 5 * n].tolist(), itm[:n, : 5 * n].tolist(), [len(c) for c in captions[:n]], 10
    )
    metrics, records = run_task(
        sharp_itm, include, ",itm_top_k=10,text_batch_size=7,itm_batch_size=5", batch_size=3, limit=n
    )
    assert all(r["n_images"] == n and r["n_texts"] == 5 * n for r in records)
    assert_pipeline_equals(metrics, records, i2t, t2i)


# ----------------------------------------------------------------------------- quantized runs

TRAINED_ITM = Path(retrieval.__file__).parent / "assets" / "tiny_blip2_itm"  # trained on the shapes world


@pytest.fixture(scope="module")
def trained_fp_metrics(corpus):
    return run_task(TRAINED_ITM, corpus[0])[0]


@pytest.mark.parametrize(
    "plan,components",
    [
        ({"method": "rtn", "component": "vit", "bits": 4}, {"vit"}),
        ({"method": "gptq", "component": "connector", "bits": 4}, {"connector"}),
        ({"method": "awq", "component": "vit+connector", "bits": 4}, {"vit", "connector"}),
    ],
)
def test_quantized_plans_run_through_the_same_task(plan, components, corpus, trained_fp_metrics, tmp_path):
    from lmms_quant.model_wrappers.loading import model_name_sanitized
    from lmms_quant.quant import Recipe

    plan = dict(plan, calib_n=8, calib_batch_size=4)
    args = "".join(f",{k}={v}" for k, v in plan.items())
    metrics, records = run_task(TRAINED_ITM, corpus[0], f"{args},report_dir={tmp_path}")

    assert len(records) == 13 and all(0.0 <= v <= 100.0 for v in metrics.values())
    # 4 bits keeps the trained model's retrieval (full precision: r_mean ~90 on this corpus).
    assert trained_fp_metrics["r_mean"] > 80
    assert metrics["r_mean"] > trained_fp_metrics["r_mean"] - 10
    # The report lies beside lmms-eval's results and names only tensors of the chosen components.
    digest = Recipe.parse(plan).digest()
    report = json.loads((tmp_path / model_name_sanitized(str(TRAINED_ITM)) / f"quant_report_{digest}.json").read_text())
    assert report["n_quantized_tensors"] > 0
    assert {t["component"] for t in report["tensors"]} == components
    assert not any(t["name"].startswith(("vision_projection", "text_projection", "itm_head")) for t in report["tensors"])


def test_two_bit_vision_encoder_costs_retrieval(corpus, trained_fp_metrics, tmp_path):
    # the paper's uniform quantizer (per-tensor min-max) at 2 bits on the ViT of the trained model
    metrics, _ = run_task(TRAINED_ITM, corpus[0], f",method=rtn,granularity=uniform,component=vit,bits=2,report_dir={tmp_path}")
    assert metrics["r_mean"] < trained_fp_metrics["r_mean"] - 10


def test_plan_keys_for_a_language_model_are_refused_before_loading():
    from lmms_eval.models import get_model

    from lmms_quant.quant import RecipeError

    model_class = get_model("quant_blip2_itm")
    for bad, named in [("component=llm", "component='llm'"), ("llm_bits=4", "llm_bits=4"), ("include=lm_head", "include='lm_head'")]:
        with pytest.raises(RecipeError, match=f"{named}.*no language model.*valid: component vit, connector"):
            # A path that does not exist: the refusal must come before any loading.
            model_class.create_from_arg_string(f"pretrained=/nonexistent,method=rtn,{bad}", {"batch_size": 1})


def test_canonical_model_args_of_a_whole_model_plan_are_accepted_again():
    # `lmms-quant eval` and sweeps pass the canonical string, which spells out llm_bits for component=all
    from lmms_eval.utils import simple_parse_args_string

    from lmms_quant.model_wrappers.blip2_itm import QuantBlip2ITM

    for given in ("pretrained=/x,method=rtn,bits=3,granularity=uniform", "pretrained=/x,method=awq,bits=4,component=all"):
        canonical = QuantBlip2ITM.canonical_model_args(given)
        assert "llm_bits=" in canonical
        _, _, plan = QuantBlip2ITM.validate_model_args(simple_parse_args_string(canonical))
        assert plan.digest() == QuantBlip2ITM.validate_model_args(simple_parse_args_string(given))[2].digest()
