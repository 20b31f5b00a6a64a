"""``quant_hf``, the generic chat-template wrapper, and ``quant_llava`` as its thin subclass, in process.

Requests are the ones lmms-eval's own chat task class builds from the shipped *_local YAMLs; models
are built the way lmms-eval builds them (get_model → create_from_arg_string with the evaluator's
additional_config).
"""

from pathlib import Path

import pytest
import torch

from lmms_eval_requests import build_tasks, all_requests, load_wrapper

import lmms_quant

TASKS = ("coco2017_cap_val_local", "flickr30k_test_local", "vqav2_val_local", "gqa_local")
DOCS_PER_TASK = 3
SHIPPED_LLAVA = Path(lmms_quant.__file__).parent / "assets" / "tiny_llava"


@pytest.fixture(scope="module")
def tasks(include_path):
    return build_tasks(include_path, TASKS, "quant_hf", DOCS_PER_TASK)


def load(model_id, checkpoint, tasks=None, batch_size=1, **model_args):
    return load_wrapper(model_id, checkpoint, tasks, batch_size, **model_args)


def test_quant_hf_is_registered_as_a_chat_model():
    from lmms_eval.models import get_model

    from lmms_quant.model_wrappers.hf import QuantHF
    from lmms_quant.model_wrappers.llava import QuantLlava

    assert get_model("quant_hf") is QuantHF and QuantHF.is_simple is False
    # quant_llava is quant_hf with LLaVA's class: no prompt or batching code of its own
    assert issubclass(QuantLlava, QuantHF)
    assert {"generate_batch", "prompt", "__init__"}.isdisjoint(vars(QuantLlava))


def llava_reference_answer(lm, request):
    """What quant_llava answered before it became a subclass: llava-1.5's prompt, one request, greedy."""
    ctx, _, gen_kwargs, doc_id, task, split = request.args
    doc = lm.task_dict[task][split][doc_id]
    inputs = lm.processor(images=[doc["image"].convert("RGB")], text=[f"USER: <image>\n{ctx} ASSISTANT:"],
                          return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
    text = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.split("\n\n")[0].strip(), int(inputs["attention_mask"].sum())


@pytest.mark.parametrize("model_id", ["quant_llava", "quant_hf"])
def test_the_shipped_llava_answers_as_before_through_quant_hf(model_id, tasks):
    requests = all_requests(tasks)
    lm = load(model_id, SHIPPED_LLAVA, tasks, batch_size=3)  # batches of 3 mix tasks and pad on the left
    answers = lm.generate_until(requests)
    expected = [llava_reference_answer(lm, r) for r in requests]
    assert [(a.text, a.token_counts.input_tokens) for a in answers] == expected
    # the trained model answers the VQA questions: the comparison is between real answers
    vqa = [a.text for a, r in zip(answers, requests) if r.args[4] == "vqav2_val_local"]
    assert all(vqa) and len(set(vqa)) > 1


def test_template_messages_keep_text_and_make_images_bare(tasks):
    from lmms_eval.protocol import ChatMessages

    from lmms_quant.model_wrappers.common import ChatRequest
    from lmms_quant.model_wrappers.hf import template_messages

    ctx, doc_to_messages, gen_kwargs, doc_id, task, split = tasks["vqav2_val_local"].instances[0].args
    doc = tasks[task].dataset[split][doc_id]
    request = ChatRequest(ctx=ctx, gen_kwargs=gen_kwargs, doc_id=doc_id, task=task, split=split, doc=doc,
                          messages=ChatMessages(messages=doc_to_messages(doc)))
    assert template_messages(request) == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ctx}]}]


def test_batched_generation_equals_batch_size_one(tiny_checkpoints, tasks):
    requests = all_requests(tasks)
    one = load("quant_hf", tiny_checkpoints["llava"], tasks, batch_size=1).generate_until(requests)
    four = load("quant_hf", tiny_checkpoints["llava"], tasks, batch_size=4).generate_until(requests)
    assert [(r.text, r.token_counts) for r in four] == [(r.text, r.token_counts) for r in one]
    assert all(r.token_counts.output_tokens > 0 for r in one)


# Every chat-template family with a tiny fixture; Gemma 3, Idefics3 and SmolVLM take images nested per prompt.
CHAT_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "llava_next", "llava_onevision",
                 "internvl"]


@pytest.mark.parametrize("kind", CHAT_FAMILIES)
def test_every_chat_family_batches_as_it_answers_one_by_one(kind, tiny_checkpoints, tasks):
    # VQAv2 and GQA share generation settings (16 new tokens): batches of 3 mix the two tasks
    requests = tasks["vqav2_val_local"].instances + tasks["gqa_local"].instances
    one = load("quant_hf", tiny_checkpoints[kind], tasks, batch_size=1)
    three = load("quant_hf", tiny_checkpoints[kind], tasks, batch_size=3).generate_until(requests)
    assert [(r.text, r.token_counts) for r in three] == [(r.text, r.token_counts) for r in one.generate_until(requests)]
    # the prompt is the family's own chat template around the task's text
    request = one.chat_request(tasks["vqav2_val_local"].instances[0].args)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.text}]}]
    assert one.prompt(request) == one.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                                    tokenize=False)
    assert request.text in one.prompt(request)


def test_a_checkpoint_without_chat_template_is_refused(tiny_checkpoints):
    # BLIP-2's processor has no chat template: its prompts are quant_blip2's job; PaliGemma's has none either
    for kind in ("blip2_opt", "paligemma"):
        with pytest.raises(ValueError, match=r"pretrained: .* has no chat template.*quant_blip2"):
            load("quant_hf", tiny_checkpoints[kind])


def test_a_wrong_key_fails_naming_it_before_loading(tmp_path):
    with pytest.raises(ValueError, match="bitz") as raised:
        load("quant_hf", tmp_path / "absent", bitz=4)
    assert "pretrained" in str(raised.value)


def test_quant_hf_quantizes_through_the_shared_seam_before_the_first_request(tiny_checkpoints, tasks, tmp_path):
    import json

    fp = load("quant_hf", tiny_checkpoints["llava"]).model.state_dict()
    lm = load("quant_hf", tiny_checkpoints["llava"], tasks, method="gptq", bits=4, component="vit", calib_n=4,
              report_dir=tmp_path)
    assert all(torch.equal(t, fp[n]) for n, t in lm.model.state_dict().items())  # lazily: nothing yet
    lm.generate_until(tasks["vqav2_val_local"].instances)
    changed = {n for n, t in lm.model.state_dict().items() if not torch.equal(t, fp[n])}
    report = json.loads(lm.report_path().read_text())
    assert changed and {f"{t['name']}.weight" for t in report["tensors"]} == changed
    assert {t["component"] for t in report["tensors"]} == {"vit"}
