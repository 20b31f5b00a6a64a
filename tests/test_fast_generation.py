"""The fast generation path gives the stock path's greedy tokens, on the shipped trained models.

Random weights cannot show this (near-ties flip under any change of float rounding); the shipped
tiny BLIP-2 and LLaVA are trained, so their argmax is decided. Each fast-path idea is checked on its
own (static cache + graph-ready decode step; one vision pass per image; the prompt prefix prefilled
once per image; features from the disk cache) against stock ``generate``, request by request, on the
requests lmms-eval's own task classes build from the *_local tasks. CPU only: the CUDA graph replays
the very step function checked here (see scripts/bench_eval.py for the GPU agreement figure).
"""

from pathlib import Path

import pytest
import torch

from lmms_eval_requests import build_tasks, all_requests

import lmms_quant

ASSETS = Path(lmms_quant.__file__).resolve().parent / "assets"
SHIPPED = {"quant_blip2": ASSETS / "tiny_blip2", "quant_llava": ASSETS / "tiny_llava"}
TASKS = ("coco2017_cap_val_local", "vqav2_val_local", "gqa_local")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two OpenMP threads on a shared two-core machine spin for milliseconds per op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tasks(include_path):
    return build_tasks(include_path, TASKS, "quant_blip2", None)


def requests_of(tasks):
    return all_requests(tasks)


def load(model_id, tasks, batch_size=4, **model_args):
    from lmms_eval.models import get_model

    arg_string = ",".join([f"pretrained={SHIPPED[model_id]}", "dtype=float32",
                           *(f"{k}={v}" for k, v in model_args.items())])
    lm = get_model(model_id).create_from_arg_string(
        arg_string, {"batch_size": str(batch_size), "max_batch_size": None, "device": None})
    for name, task in tasks.items():
        lm.task_dict[name] = task.dataset
    return lm


def answers(results):
    return [(r.text, r.token_counts.input_tokens, r.token_counts.output_tokens) for r in results]


@pytest.fixture(scope="module")
def stock(tasks):
    """Every request answered by stock transformers generate (the reference), per model."""
    out = {}
    for model_id in SHIPPED:
        lm = load(model_id, tasks, fast_generate="false")
        out[model_id] = answers(lm.generate_until(requests_of(tasks)))
        assert lm._generation_path.summary()["fast_requests"] == 0
    return out


def distinct_images(tasks):
    from lmms_quant.model_wrappers.vision_cache import image_key

    return {image_key(doc["image"].convert("RGB")) for task in tasks.values() for split in task.dataset.values()
            for doc in split}


VARIANTS = {
    "static cache": dict(share_images=False, share_prefix=False),
    "one vision pass per image": dict(share_images=True, share_prefix=False),
    "prefix prefilled once per image": dict(share_images=True, share_prefix=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_id", SHIPPED)
def test_every_fast_path_gives_the_stock_greedy_answers(model_id, variant, tasks, stock):
    requests = requests_of(tasks)
    lm = load(model_id, tasks, batch_size=5, fast_generate="true")
    path = lm._generation_path if hasattr(lm, "_generation_path") else None
    from lmms_quant.model_wrappers.generation import generation_path

    path = path or generation_path(lm)
    for name, value in VARIANTS[variant].items():
        setattr(path, name, value)
    got = answers(lm.generate_until(requests))
    assert got == stock[model_id]
    summary = path.summary()
    assert summary["fast_requests"] == len(requests) and summary["stock_requests"] == 0
    assert summary["decoder"]["eager_steps"] > 0
    if variant == "static cache":
        assert summary["images_encoded"] == len(requests)
        assert summary["prefix_tokens"] == 0
    else:
        # VQAv2 and GQA ask several questions about each image: each image went through the tower once.
        assert summary["images_encoded"] == len(distinct_images(tasks)) < len(requests)
    if variant == "prefix prefilled once per image":
        assert summary["prefix_tokens"] > 0


@pytest.mark.parametrize("model_id", SHIPPED)
def test_the_decoder_gives_generates_tokens_one_for_one(model_id, tasks):
    """Token ids, not only texts: left-padded stock generate vs the static-cache decoder on the same batch."""
    from lmms_quant.model_wrappers.generation import generation_path

    lm = load(model_id, tasks, fast_generate="true")
    path = generation_path(lm)
    vqa = tasks["vqav2_val_local"].instances[:7]  # questions of different lengths about 2 images
    (rows, greedy, _), stock = path._split(vqa, list(range(len(vqa))))
    assert not stock and len({r.image_key for r in rows}) < len(rows)
    path._setup()
    fast = path._generate(rows, greedy, len(rows), None)
    chat = [r.request for r in rows]
    prompts, images = zip(*[lm.prompt_and_images(r) for r in chat])
    inputs = lm.processor_inputs(list(prompts), list(images))  # what the stock path gives generate
    assert [int(n) for n in inputs["attention_mask"].sum(1)] == [len(r.ids) for r in rows]
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=greedy.max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    reference = out[:, inputs["input_ids"].shape[1]:]
    assert fast.shape == reference.shape
    assert torch.equal(fast, reference)
    assert path.stats["prefix_tokens"] > 0


def test_features_from_the_disk_cache_give_the_same_answers_without_the_vision_tower(tasks, stock, tmp_path):
    requests = requests_of(tasks)
    first = load("quant_llava", tasks, fast_generate="true", feature_cache=tmp_path / "features")
    assert answers(first.generate_until(requests)) == stock["quant_llava"]
    n_images = len(distinct_images(tasks))
    assert first._generation_path.summary()["feature_cache"]["writes"] == n_images
    # Another configuration that leaves the vision tower and connector in floating point (an 8-bit LLM):
    # it reads every image's features from disk and never runs the tower.
    second = load("quant_llava", tasks, fast_generate="true", feature_cache=tmp_path / "features",
                  method="rtn", bits=8, component="llm")
    second.generate_until(requests)
    summary = second._generation_path.summary()
    assert summary["images_encoded"] == 0 and summary["feature_cache"]["hits"] == n_images
    # The same FP model again: answers from cached features are the stock answers.
    third = load("quant_llava", tasks, fast_generate="true", feature_cache=tmp_path / "features")
    assert answers(third.generate_until(requests)) == stock["quant_llava"]
    assert third._generation_path.summary()["images_encoded"] == 0


def test_a_recipe_that_quantizes_the_vision_tower_does_not_use_the_feature_cache(tasks, tmp_path):
    lm = load("quant_blip2", tasks, fast_generate="true", feature_cache=tmp_path / "features",
              method="rtn", bits=4, component="vit")
    lm.generate_until(tasks["vqav2_val_local"].instances[:3])
    summary = lm._generation_path.summary()
    assert "feature_cache" not in summary and summary["images_encoded"] > 0
    assert not (tmp_path / "features").exists()


def test_requests_the_fast_path_cannot_serve_go_to_stock_generate(tasks, stock):
    from lmms_eval.api.instance import Instance

    requests = requests_of(tasks)
    # Beam search and a repetition penalty are not plain greedy search: transformers serves them.
    beams = [Instance(request_type=r.request_type, arguments=(*r.args[:2], {**r.args[2], "num_beams": 2}, *r.args[3:]),
                      idx=0, metadata=dict(r.metadata)) for r in requests[:2]]
    lm = load("quant_blip2", tasks, fast_generate="true")
    stock_lm = load("quant_blip2", tasks, fast_generate="false")
    assert answers(lm.generate_until(beams)) == answers(stock_lm.generate_until(beams))
    summary = lm._generation_path.summary()
    assert summary["fast_requests"] == 0 and summary["stock_requests"] == 2
    assert any("beam" in reason for reason in summary["stock_reasons"])


def test_fast_generate_is_off_on_cpu_unless_asked_and_refuses_bad_values(tasks, tmp_path):
    lm = load("quant_blip2", tasks)
    lm.generate_until(tasks["gqa_local"].instances[:2])
    assert lm._generation_path.summary()["fast_requests"] == 0
    with pytest.raises(ValueError, match="fast_generate.*true, false or auto"):
        load("quant_blip2", tasks, fast_generate="fastest")


def test_fast_generate_and_feature_cache_are_wrapper_keys_outside_the_recipe(tmp_path):
    from lmms_eval.utils import simple_parse_args_string

    from lmms_quant.model_wrappers.blip2 import QuantBlip2

    plain = f"pretrained={tmp_path},method=rtn,bits=4"
    fast = f"{plain},fast_generate=false,feature_cache={tmp_path / 'f'}"
    _, _, recipe = QuantBlip2.validate_model_args(simple_parse_args_string(plain))
    _, _, same = QuantBlip2.validate_model_args(simple_parse_args_string(fast))
    assert recipe.digest() == same.digest()  # results, reports and the weight cache do not depend on them
    canonical = simple_parse_args_string(QuantBlip2.canonical_model_args(fast))
    assert canonical["fast_generate"] is False  # ... but lmms-eval's response cache key sees the kill switch
    assert canonical["feature_cache"] == str(tmp_path / "f")


def _evaluate(model_id, include_path, tasks, fast, extra=""):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model_id, model_args=f"pretrained={SHIPPED[model_id]},dtype=float32,fast_generate={fast}{extra}",
        tasks=list(tasks), task_manager=TaskManager(include_path=str(include_path), model_name=model_id),
        batch_size=4, log_samples=True)
    responses = {task: [(s["doc_id"], s["filtered_resps"]) for s in samples] for task, samples in results["samples"].items()}
    return results["results"], responses


def _scores_are_the_same_through_lmms_eval(model_id, eval_tasks, include_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # COCO's aggregation writes submissions/ into the working directory
    stock_scores, stock_responses = _evaluate(model_id, include_path, eval_tasks, "false")
    cache = f",feature_cache={tmp_path / 'features'}"
    fast_scores, fast_responses = _evaluate(model_id, include_path, eval_tasks, "true", cache)  # writes features
    cached_scores, cached_responses = _evaluate(model_id, include_path, eval_tasks, "true", cache)  # reads them
    assert fast_responses == stock_responses == cached_responses
    assert fast_scores == stock_scores == cached_scores
    assert set(fast_scores) == set(eval_tasks)
    assert list((tmp_path / "features").rglob("*.safetensors"))


@pytest.mark.parametrize("model_id", SHIPPED)
def test_lmms_eval_scores_vqa_the_same_with_the_fast_path(model_id, include_path, tmp_path, monkeypatch):
    _scores_are_the_same_through_lmms_eval(model_id, ("vqav2_val_local", "gqa_local"), include_path, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", SHIPPED)
def test_lmms_eval_scores_captions_the_same_with_the_fast_path(model_id, include_path, tmp_path, monkeypatch):
    _scores_are_the_same_through_lmms_eval(model_id, ("coco2017_cap_val_local", "flickr30k_test_local"), include_path,
                                           tmp_path, monkeypatch)


def _oom_above(limit, real):
    def generate(*args, rows=None, **kwargs):
        if rows > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {rows} rows > {limit})")
        return real(*args, rows=rows, **kwargs)
    return generate


def test_batch_size_auto_halves_until_the_batch_fits_and_keeps_that_size(tasks, stock, monkeypatch):
    from lmms_eval.models import get_model

    from lmms_quant.model_wrappers import decoding

    monkeypatch.setattr(decoding.StaticCacheDecoder, "generate",
                        _oom_above(3, decoding.StaticCacheDecoder.generate))
    lm = get_model("quant_blip2").create_from_arg_string(
        f"pretrained={SHIPPED['quant_blip2']},dtype=float32,fast_generate=true",
        {"batch_size": "auto", "max_batch_size": 8, "device": None})  # what lmms-eval passes for --batch_size auto
    for name, task in tasks.items():
        lm.task_dict[name] = task.dataset
    assert answers(lm.generate_until(requests_of(tasks))) == stock["quant_blip2"]
    # 8 and 4 do not fit, 2 does: found once per task shape (captions, VQA questions), then kept.
    assert lm.batch_sizes and set(lm.batch_sizes.values()) == {2}


def test_batch_size_auto_also_sizes_the_stock_path(tasks, stock, monkeypatch):
    from lmms_eval.models import get_model

    lm = get_model("quant_llava").create_from_arg_string(
        f"pretrained={SHIPPED['quant_llava']},dtype=float32,fast_generate=false",
        {"batch_size": "auto", "max_batch_size": 8, "device": None})
    for name, task in tasks.items():
        lm.task_dict[name] = task.dataset
    real = lm.generate_batch

    def generate_batch(requests, gen_kwargs):
        if len(requests) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(requests, gen_kwargs)

    monkeypatch.setattr(lm, "generate_batch", generate_batch)
    assert answers(lm.generate_until(requests_of(tasks))) == stock["quant_llava"]
    assert set(lm.batch_sizes.values()) == {4}


def test_batch_size_values():
    from lmms_quant.model_wrappers.loading import parse_batch_size, parse_wrapper_args

    assert parse_batch_size("auto") == "auto" and parse_batch_size("3") == 3
    with pytest.raises(ValueError, match="batch_size.*'auto:4'.*positive integer or 'auto'"):
        parse_batch_size("auto:4")
    args = parse_wrapper_args({"pretrained": "x", "batch_size": "auto", "max_batch_size": 32})
    assert args.auto_batch and args.batch_size == 32
    assert parse_wrapper_args({"pretrained": "x", "batch_size": "auto"}).batch_size == 64
    with pytest.raises(ValueError, match="max_batch_size"):
        parse_wrapper_args({"pretrained": "x", "max_batch_size": 0})


def test_only_plain_greedy_search_is_served_fast():
    from transformers import GenerationConfig

    from lmms_quant.model_wrappers.decoding import Greedy, greedy_settings

    base = GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2)
    assert greedy_settings(base, {"max_new_tokens": 16, "do_sample": False, "temperature": 0}) == Greedy(16, (1,), 0)
    assert greedy_settings(GenerationConfig(eos_token_id=[1, 5]), {"max_new_tokens": 4}) == Greedy(4, (1, 5), 1)
    assert "sampling" in greedy_settings(base, {"max_new_tokens": 4, "do_sample": True})
    assert "beam" in greedy_settings(base, {"max_new_tokens": 4, "num_beams": 3})
    assert "repetition_penalty" in greedy_settings(base, {"max_new_tokens": 4, "repetition_penalty": 1.2})
    assert "max_new_tokens" in greedy_settings(base, {"max_length": 30})
    with_processor = GenerationConfig(eos_token_id=1, no_repeat_ngram_size=3)  # from a checkpoint's generation_config
    assert "no_repeat_ngram_size" in greedy_settings(with_processor, {"max_new_tokens": 4})


def test_rows_are_ordered_image_by_image_longest_prompts_first():
    from lmms_quant.model_wrappers.generation import Row, common_prefix_len, order_rows

    def row(i, key, n):
        return Row(i, None, "", None, key, key, list(range(n)))

    rows = [row(0, "a", 5), row(1, "b", 9), row(2, "a", 7), row(3, "c", 3), row(4, "b", 2)]
    assert [r.index for r in order_rows(rows)] == [1, 4, 2, 0, 3]
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[7, 8], [7, 8]]) == 2


@pytest.mark.parametrize("model_id", SHIPPED)
def test_prompt_ids_without_transforming_each_image_are_the_processors(model_id, tasks, monkeypatch):
    from lmms_quant.model_wrappers.prompt_ids import PromptIds

    lm = load(model_id, tasks)
    chat = [lm.chat_request(r.args) for r in requests_of(tasks)]
    prompts, images = zip(*[(p, i[0]) for p, i in (lm.prompt_and_images(r) for r in chat)])
    expected = [lm.processor_inputs([prompt], [[image]])["input_ids"][0].tolist()  # the stock path's call
                for prompt, image in zip(prompts, images)]
    from lmms_quant.model_wrappers.prompt_ids import _leaves

    transformed = []
    image_processor = type(lm.processor.image_processor)
    real = image_processor.__call__

    def counting(self, images=None, *args, **kwargs):
        transformed.extend(_leaves(images))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(image_processor, "__call__", counting)
    encoder = PromptIds(lm.processor, lm.processor_inputs)
    assert encoder.many(list(prompts), list(images)) == expected
    assert not encoder.exact
    # Two images transformed (the check's real one, and one stand-in), whatever the number of requests.
    assert len(transformed) == 2 < len(prompts)


def test_a_prompt_repeated_over_images_is_tokenized_once_with_the_processors_ids(tasks):
    from lmms_quant.model_wrappers.prompt_ids import PromptIds

    lm = load("quant_blip2", tasks)
    chat = [lm.chat_request(r.args) for r in requests_of(tasks)]
    prompts, images = zip(*[(p, i[0]) for p, i in (lm.prompt_and_images(r) for r in chat)])
    prompts, images = list(prompts) * 3, list(images) * 3  # every prompt three times, over other images too
    images = images[1:] + images[:1]
    expected = [lm.processor_inputs([prompt], [[image]])["input_ids"][0].tolist()
                for prompt, image in zip(prompts, images)]
    calls = []
    encoder = PromptIds(lm.processor, lm.processor_inputs)
    real_call = encoder._call
    encoder._call = lambda ps, ims: calls.append(len(ps)) or real_call(ps, ims)
    first = encoder.many(prompts, images)
    assert first == expected and not encoder.exact
    assert sum(calls) - 3 == len(set(prompts))  # the check's three prompts, then each distinct prompt once
    calls.clear()
    assert encoder.many(prompts[::-1], images[::-1]) == expected[::-1] and calls == []  # all known now
    first[0].append(-1)  # a caller's list is its own
    assert encoder.many(prompts[:1], images[:1]) == expected[:1]


def test_chunked_serving_prepares_ahead_and_still_encodes_each_image_once(tasks, stock, monkeypatch):
    from lmms_quant.model_wrappers import generation

    monkeypatch.setattr(generation, "CHUNK_MIN", 7)  # several chunks per task: the next one is prepared meanwhile
    monkeypatch.setattr(generation, "CHUNK_BATCHES", 1)
    requests = requests_of(tasks)
    lm = load("quant_llava", tasks, batch_size=3, fast_generate="true")
    assert answers(lm.generate_until(requests)) == stock["quant_llava"]
    summary = lm._generation_path.summary()
    assert summary["images_encoded"] == len(distinct_images(tasks))
    assert summary["batches"] > len(requests) / 3  # questions of one image split over chunks: more, smaller batches


@pytest.mark.parametrize("model_id", SHIPPED)
def test_the_decode_step_never_reads_a_tensor_on_the_host(model_id):
    """What CUDA graph capture needs: the step (and the set-up before its replays) runs on meta tensors,
    which hold no data, so any .item(), bool() or copy to the CPU would raise."""
    from transformers import AutoConfig, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    from lmms_quant.model_wrappers.decoding import Greedy, Prompts, StaticCacheDecoder, _State
    from lmms_quant.model_wrappers.vlm_parts import parts_for

    config = AutoConfig.from_pretrained(SHIPPED[model_id])
    cls = Blip2ForConditionalGeneration if model_id == "quant_blip2" else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(config).eval()
    parts, why = parts_for(model)
    assert parts is not None, why
    decoder = StaticCacheDecoder(parts, torch.device("meta"), use_graph=False)
    text = config.get_text_config()
    heads, head_dim = text.num_key_value_heads if hasattr(text, "num_key_value_heads") else text.num_attention_heads, \
        getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rows, meta = 3, dict(device="meta")
    state = _State(parts, rows, 32, Greedy(8, (1,), 0), torch.device("meta"), decoder.dtype)
    for layer in state.cache.layers:  # a prefilled cache of 6 slots (prefill itself runs before capture)
        layer.update(torch.zeros(rows, heads, 6, head_dim, **meta), torch.zeros(rows, heads, 6, head_dim, **meta))
    prompts = Prompts(None, torch.zeros(rows, dtype=torch.long, **meta), torch.zeros(rows, 6, text.hidden_size, **meta),
                      torch.ones(rows, 6, dtype=torch.bool, **meta))
    with torch.no_grad():
        decoder._start_decode(state, prompts, torch.zeros(rows, dtype=torch.long, **meta))
        decoder._step(state)
        decoder._step(state)


def test_auto_sizing_halves_on_out_of_memory_only_and_keeps_the_size_per_shape():
    from lmms_quant.model_wrappers.batch_size import BatchSizes, is_out_of_memory

    released, tried = [], []

    def serve(batch, size):
        tried.append(len(batch))
        assert len(batch) <= size  # the size being tried; the last batch may be short
        if len(batch) > 5:  # wrapped, as the wrappers re-raise generation errors
            raise RuntimeError("generation failed") from torch.OutOfMemoryError("CUDA out of memory")
        return [x * 2 for x in batch]

    sizes = BatchSizes(auto=True, fixed=1, start=32, release=lambda: released.append(1))
    assert sizes.serve(list(range(30)), "a", serve) == [x * 2 for x in range(30)]
    assert tried == [30, 16, 8] + [4] * 7 + [2]  # 32 > 30 items, so the first try is all of them
    assert sizes.sizes == {"a": 4} and len(released) == 3
    tried.clear()
    sizes.serve(list(range(8)), "a", serve)
    assert tried == [4, 4]  # found once, then kept for that shape

    def not_memory(batch, size):
        raise ValueError("a bug, not a full GPU")

    with pytest.raises(ValueError):
        sizes.serve([1], "b", not_memory)
    assert not is_out_of_memory(ValueError("a bug"))
    fixed = BatchSizes(auto=False, fixed=8, start=None, release=lambda: None)
    with pytest.raises(RuntimeError, match="generation failed"):  # a fixed batch size is not searched
        fixed.serve(list(range(9)), "a", serve)
