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
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config

    built = {}
    for name in TASKS:
        config = load_yaml_config(str(Path(include_path) / f"{name}.yaml"), mode="full")
        task = ConfigurableMessagesTask(config=config, model_name="quant_blip2")
        task.build_all_requests(limit=None, rank=0, world_size=1)
        built[name] = task
    return built


def requests_of(tasks):
    return [instance for task in tasks.values() for instance in task.instances]


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
    prompts_images = [lm.prompt_and_images(r) for r in chat]
    inputs = lm.processor(images=[i for _, im in prompts_images for i in im], text=[p for p, _ in prompts_images],
                          padding=True, return_tensors="pt")
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
