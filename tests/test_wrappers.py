"""The lmms-eval model classes quant_blip2 / quant_llava, in process.

Models are built the way lmms-eval builds them (entry point → get_model → create_from_arg_string with
the evaluator's additional_config) and fed the Instances that lmms-eval's own chat task class
(ConfigurableMessagesTask, from the shipped *_local YAMLs) builds on the synthetic data.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

TASKS = ("coco2017_cap_val_local", "flickr30k_test_local", "vqav2_val_local", "gqa_local")
DOCS_PER_TASK = 4  # COCO and Flickr30k share generation settings: 8 requests, batches of 3 mix them


@pytest.fixture(scope="module")
def tasks(include_path):
    """lmms-eval chat task objects on local data, their requests built as the evaluator builds them."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config

    built = {}
    for name in TASKS:
        config = load_yaml_config(str(Path(include_path) / f"{name}.yaml"), mode="full")
        task = ConfigurableMessagesTask(config=config, model_name="quant_blip2")
        task.build_all_requests(limit=DOCS_PER_TASK, rank=0, world_size=1)
        built[name] = task
    return built


def all_requests(tasks):
    return [instance for task in tasks.values() for instance in task.instances]


def load(model_id, checkpoint, tasks=None, batch_size=1, **model_args):
    from lmms_eval.models import get_model

    arg_string = ",".join([f"pretrained={checkpoint}", "dtype=float32", *(f"{k}={v}" for k, v in model_args.items())])
    # What lmms-eval's simple_evaluate passes; --batch_size arrives as a string.
    lm = get_model(model_id).create_from_arg_string(
        arg_string, {"batch_size": str(batch_size), "max_batch_size": None, "device": None}
    )
    for name, task in (tasks or {}).items():
        lm.task_dict[name] = task.dataset
    return lm


def with_gen_kwargs(instance, **changes):
    """The same request with other generation settings."""
    from lmms_eval.api.instance import Instance

    args = list(instance.args)
    args[2] = {**args[2], **changes}
    return Instance(request_type=instance.request_type, arguments=tuple(args), idx=0, metadata=dict(instance.metadata))


MODELS = [("quant_blip2", "blip2_opt"), ("quant_blip2", "blip2_t5"), ("quant_llava", "llava")]


def test_model_ids_resolve_to_chat_models():
    from lmms_eval.models import get_model

    from lmms_quant.model_wrappers.blip2 import QuantBlip2
    from lmms_quant.model_wrappers.llava import QuantLlava

    assert get_model("quant_blip2") is QuantBlip2 and get_model("quant_llava") is QuantLlava
    assert QuantBlip2.is_simple is False and QuantLlava.is_simple is False


@pytest.mark.parametrize("model_id,kind", MODELS)
def test_batched_generation_equals_batch_size_one(model_id, kind, tiny_checkpoints, tasks):
    requests = all_requests(tasks)
    # COCO and Flickr30k share generation settings, so a batch of 3 mixes the two tasks (and splits).
    assert tasks["coco2017_cap_val_local"].instances[0].args[2] == tasks["flickr30k_test_local"].instances[0].args[2]
    one = load(model_id, tiny_checkpoints[kind], tasks, batch_size=1).generate_until(requests)
    three = load(model_id, tiny_checkpoints[kind], tasks, batch_size=3).generate_until(requests)
    assert len(one) == len(three) == len(requests)
    assert [r.text for r in three] == [r.text for r in one]
    assert [r.token_counts for r in three] == [r.token_counts for r in one]
    assert all(r.token_counts.output_tokens > 0 for r in one)


@pytest.mark.parametrize("kind,vqa_prompt", [("blip2_opt", "Question: {} Answer:"), ("blip2_t5", "Question: {} Short answer:")])
def test_blip2_answers_continue_blip2s_own_prompts(kind, vqa_prompt, tiny_checkpoints, tasks):
    """VQA: "Question: {q} Answer:" (OPT) / "... Short answer:" (Flan-T5) from doc["question"]; captions: no prompt.
    The answer is only what the model generated after that prompt, cut at `until`."""
    lm = load("quant_blip2", tiny_checkpoints[kind], tasks)
    picked = [tasks["vqav2_val_local"].instances[1], tasks["gqa_local"].instances[0], tasks["coco2017_cap_val_local"].instances[0]]
    answers = lm.generate_until(picked)
    for request, answer in zip(picked, answers):
        _, _, gen_kwargs, doc_id, task, split = request.args
        doc = tasks[task].dataset[split][doc_id]
        prompt = vqa_prompt.format(doc["question"]) if task != "coco2017_cap_val_local" else ""
        inputs = lm.processor(images=[doc["image"].convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
        new = out[0, 1:] if kind == "blip2_t5" else out[0, inputs["input_ids"].shape[1]:]
        expected = lm.tokenizer.decode(new, skip_special_tokens=True).split("\n\n")[0].strip()
        assert answer.text == expected, (task, prompt)
        assert answer.token_counts.input_tokens == int(inputs["attention_mask"].sum())


def test_blip2_tells_captioning_from_vqa(tiny_checkpoints, tasks):
    from lmms_quant.model_wrappers.blip2 import blip2_prompt

    lm = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks)
    prompts = {name: [blip2_prompt(lm.chat_request(i.args), lm.vqa_prompt, lm.caption_prompt) for i in task.instances]
               for name, task in tasks.items()}
    # COCO docs carry a `question` field too (a fixed caption instruction), but it is not what the task asks.
    assert tasks["coco2017_cap_val_local"].dataset["val"][0]["question"]
    assert prompts["coco2017_cap_val_local"] == [""] * DOCS_PER_TASK
    assert prompts["flickr30k_test_local"] == [""] * DOCS_PER_TASK
    for name, split in [("vqav2_val_local", "validation"), ("gqa_local", "testdev")]:
        questions = [tasks[name].dataset[split][i]["question"] for i in range(DOCS_PER_TASK)]
        assert prompts[name] == [f"Question: {q} Answer:" for q in questions]

    custom = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks, caption_prompt="a photo of")
    request = custom.chat_request(tasks["coco2017_cap_val_local"].instances[0].args)
    assert blip2_prompt(request, custom.vqa_prompt, custom.caption_prompt) == "a photo of"


def test_llava_prompts_through_its_chat_template(tiny_checkpoints, tasks):
    lm = load("quant_llava", tiny_checkpoints["llava"], tasks)
    request = tasks["vqav2_val_local"].instances[0]
    ctx, _, gen_kwargs, doc_id, task, split = request.args
    doc = tasks[task].dataset[split][doc_id]
    answer = lm.generate_until([request])[0]
    prompt = f"USER: <image>\n{ctx} ASSISTANT:"  # llava-1.5-hf's template (the fixture ships the same)
    assert ctx == f"{doc['question']}\nAnswer the question using a single word or phrase."
    inputs = lm.processor(images=[doc["image"].convert("RGB")], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
    expected = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).split("\n\n")[0].strip()
    assert expected and answer.text == expected


def test_until_truncates_the_answer(tiny_checkpoints, tasks):
    lm = load("quant_llava", tiny_checkpoints["llava"], tasks)
    request = tasks["vqav2_val_local"].instances[0]
    full = lm.generate_until([with_gen_kwargs(request, until=[])])[0].text
    assert len(full) >= 6, full  # the check below needs text on both sides of the stop string
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.find(stop)].strip()
    assert expected and expected != full
    assert lm.generate_until([with_gen_kwargs(request, until=[stop])])[0].text == expected
    assert lm.generate_until([with_gen_kwargs(request, until=stop)])[0].text == expected  # a bare string works too


def test_truncate_at_cuts_at_the_earliest_stop_string():
    from lmms_quant.model_wrappers.requests import truncate_at

    assert truncate_at(" a red circle\n\nQuestion: x", ["Question:", "\n\n"]) == "a red circle"
    assert truncate_at("two", []) == "two"
    assert truncate_at("two", ["zzz"]) == "two"


def test_generation_settings_become_transformers_kwargs():
    from lmms_quant.model_wrappers.requests import hf_generate_kwargs

    coco = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}
    kwargs, stops = hf_generate_kwargs(coco, pad_token_id=0)
    assert kwargs == {"max_new_tokens": 64, "num_beams": 1, "do_sample": False, "pad_token_id": 0}
    assert stops == ["\n\n"]
    kwargs, _ = hf_generate_kwargs({"until": ["\n\n"], "image_aspect_ratio": "pad", "temperature": 0.7}, pad_token_id=None)
    assert kwargs == {"temperature": 0.7, "do_sample": True, "max_new_tokens": 128}


def test_a_generation_error_raises(tiny_checkpoints, tasks, monkeypatch):
    lm = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks)

    def broken_kernel(**_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(lm.model, "generate", broken_kernel)
    with pytest.raises(RuntimeError, match=r"generation failed for vqav2_val_local/validation doc 0.*illegal memory access"):
        lm.generate_until(tasks["vqav2_val_local"].instances[:1])


def test_unsupported_request_types_raise(tiny_checkpoints):
    lm = load("quant_llava", tiny_checkpoints["llava"])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_a_missing_checkpoint_directory_is_named_with_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained='.*absent' is invalid \(no such directory\); valid: a local"):
        load("quant_blip2", tmp_path / "absent")


def test_a_wrong_model_args_key_fails_naming_it_before_loading(tmp_path):
    # The checkpoint does not exist: the error must come from the argument check, not from loading.
    with pytest.raises(ValueError, match="bitz") as raised:
        load("quant_blip2", tmp_path / "absent", bitz=4)
    assert "pretrained" in str(raised.value)  # the wrapper's keys are among the valid ones listed


@pytest.mark.parametrize("model_args,extra,match", [
    ({"dtype": "float8"}, {}, r"dtype='float8' is invalid; valid: auto, float16, bfloat16, float32"),
    ({"trust_remote_code": "maybe"}, {}, r"trust_remote_code='maybe' is invalid; valid: true or false"),
    ({"vqa_prompt": "Answer:"}, {}, r"vqa_prompt: got 'Answer:'"),
    ({}, {"batch_size": "auto:4"}, r"batch_size: got 'auto:4'; valid: a positive integer or 'auto'"),
])
def test_bad_wrapper_values_fail_before_loading(tmp_path, model_args, extra, match):
    from lmms_quant.model_wrappers.blip2 import QuantBlip2

    with pytest.raises(ValueError, match=match):
        QuantBlip2(pretrained=str(tmp_path / "absent"), **{"batch_size": 1, **model_args, **extra})


def test_the_fp16_plan_never_quantizes(tiny_checkpoints, tasks, monkeypatch):
    import lmms_quant.quant.api as api

    def must_not_run(*args, **kwargs):
        raise AssertionError("quantize called for the fp16 plan")

    monkeypatch.setattr(api, "quantize", must_not_run)
    lm = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks)
    assert lm.recipe.is_noop
    assert len(lm.generate_until(tasks["vqav2_val_local"].instances[:1])) == 1


def test_quantization_runs_once_before_the_first_request_and_reports(tiny_checkpoints, tasks, data_root, tmp_path, monkeypatch):
    import lmms_quant.quant.api as api

    log, seen = [], {}
    real_quantize = api.quantize

    def recording_quantize(model, processor, plan, **kwargs):
        log.append("quantize")
        seen.update(kwargs)
        return real_quantize(model, processor, plan, **kwargs)

    monkeypatch.setattr(api, "quantize", recording_quantize)
    lm = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks, method="rtn", bits=8, calib_n=4, calib_batch_size=2, report_dir=tmp_path / "out")
    assert log == []  # nothing is quantized at construction: the evaluated datasets are not known yet
    real_generate = lm.model.generate
    monkeypatch.setattr(lm.model, "generate", lambda **kw: log.append("generate") or real_generate(**kw))
    lm.generate_until(tasks["vqav2_val_local"].instances + tasks["coco2017_cap_val_local"].instances)
    lm.generate_until(tasks["gqa_local"].instances)
    assert log[0] == "quantize" and log.count("quantize") == 1 and "generate" in log
    datasets = set(seen["evaluated"])
    assert ("parquet", None, "validation") in datasets and ("parquet", None, "val") in datasets
    assert (str(Path(data_root) / "vqav2_val" / "validation.parquet"), None, "validation") in datasets
    assert (str(Path(data_root) / "coco2017_cap_val" / "val.parquet"), None, "val") in datasets
    # <report_dir>/<model_name_sanitized>/quant_report_<digest>.json, the name lmms-eval gives the results dir
    sanitized = f"{Path(tiny_checkpoints['blip2_opt']).parent.name}__{Path(tiny_checkpoints['blip2_opt']).name}"
    assert lm.report_path() == tmp_path / "out" / sanitized / f"quant_report_{lm.recipe.digest()}.json"
    assert json.loads(lm.report_path().read_text()) == json.loads(json.dumps(lm.quant_report))


def test_report_sits_beside_lmms_evals_results(monkeypatch):
    from lmms_quant.model_wrappers.loading import cli_output_path, model_name_sanitized

    argv = ["lmms-eval", "--model", "quant_blip2", "--model_args", "pretrained=/ckpts/Salesforce/blip2-opt-2.7b,bits=4",
            "--tasks", "coco2017_cap_val_local", "--output_path", "/runs/a", "--batch_size", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli_output_path() == "/runs/a"
    assert model_name_sanitized("/ckpts/Salesforce/blip2-opt-2.7b") == "Salesforce__blip2-opt-2.7b"
    monkeypatch.setattr(sys, "argv", ["lmms-eval", "--output_path=/runs/b"])
    assert cli_output_path() == "/runs/b"
    assert model_name_sanitized("llava-hf/llava-1.5-7b-hf") == "llava-hf__llava-1.5-7b-hf"
    monkeypatch.setattr(sys, "argv", ["python", "-m", "pytest"])
    assert cli_output_path() is None


def test_canonical_model_args_spell_out_the_plan(tmp_path):
    from lmms_eval.utils import simple_parse_args_string

    import lmms_quant
    from lmms_quant.model_wrappers.blip2 import QuantBlip2

    canonical = QuantBlip2.canonical_model_args(f"dtype=float32,pretrained={tmp_path}")
    parsed = simple_parse_args_string(canonical)
    assert canonical.startswith(f"pretrained={tmp_path},")
    assert parsed["dtype"] == "float32" and parsed["lmms_quant_version"] == lmms_quant.__version__
    _, _, plan = QuantBlip2.validate_model_args(parsed)
    assert plan.is_noop and set(plan.to_model_args()) <= set(parsed)
    assert QuantBlip2.canonical_model_args(canonical) == canonical
    with pytest.raises(ValueError, match="bitz"):
        QuantBlip2.canonical_model_args(f"pretrained={tmp_path},bitz=4")
    with pytest.raises(ValueError, match="lmms_quant_version"):
        QuantBlip2.canonical_model_args(f"pretrained={tmp_path},lmms_quant_version=0.0.1")


def test_a_weight_cache_hit_reproduces_the_quantized_model_without_quantizing(tiny_checkpoints, tasks, tmp_path, monkeypatch):
    import lmms_quant.quant.api as api

    calls = []
    real_quantize = api.run_quantization
    monkeypatch.setattr(api, "run_quantization", lambda *a, **k: calls.append(1) or real_quantize(*a, **k))
    args = dict(method="awq", bits=3, component="all", calib_n=4, weight_cache=tmp_path / "cache")
    first = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks, report_dir=tmp_path / "a", **args)
    first.ensure_quantized(tasks["vqav2_val_local"].instances)
    second = load("quant_blip2", tiny_checkpoints["blip2_opt"], tasks, report_dir=tmp_path / "b", **args)
    second.ensure_quantized(tasks["gqa_local"].instances)  # another task: the same quantized weights
    assert len(calls) == 1
    assert first.quant_report["weight_cache"]["hit"] is False and second.quant_report["weight_cache"]["hit"] is True
    fresh = load("quant_blip2", tiny_checkpoints["blip2_opt"]).model.state_dict()
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    changed = [name for name, tensor in fresh.items() if not torch.equal(tensor, first_state[name])]
    assert changed  # the plan did change the model ...
    assert all(torch.equal(first_state[name], second_state[name]) for name in fresh)  # ... and the hit reproduces it
    assert first.quant_report["tensors"] == second.quant_report["tensors"]
