"""The checkpoints shipped in lmms_quant/assets load offline and answer held-out synthetic data well.

Quick checks only (a few held-out scenes, prompted exactly as the lmms-eval wrappers prompt); the
full metrics are in lmms_quant/assets/TRAINING.md and are what `lmms-quant demo` measures.
Held-out scenes come from the "test-shipped" seed stream: training used "train:{seed}", the
evaluation data "eval:...", calibration "calib:...".
"""

import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    LlavaForConditionalGeneration,
)

import lmms_quant
from lmms_quant.fixtures import shapes

ASSETS = Path(lmms_quant.__file__).parent / "assets"
SHIPPED = {
    "tiny_blip2": Blip2ForConditionalGeneration,
    "tiny_blip2_itm": Blip2ForImageTextRetrieval,
    "tiny_llava": LlavaForConditionalGeneration,
}
# What lmms-eval's VQAv2/GQA tasks append to the question; quant_llava passes it to the chat template.
TASK_VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
TASK_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
# Colours swapped, places swapped: a caption that names the right objects but the wrong picture.
SWAPS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def heldout_scenes(n: int, distinct: bool = False) -> list:
    """n held-out scenes; distinct=True keeps only scenes whose captions no earlier scene shares."""
    rng = random.Random("test-shipped")
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = shapes.make_scene(rng)
        key = frozenset(shapes.captions(scene))
        if distinct and key in seen:
            continue
        seen.add(key)
        scenes.append(scene)
    return scenes


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    cache = {}

    def load(name):
        if name not in cache:
            model = SHIPPED[name].from_pretrained(ASSETS / name, local_files_only=True).eval()
            cache[name] = (model, AutoProcessor.from_pretrained(ASSETS / name, local_files_only=True))
        return cache[name]

    return load


def generate(model, processor, images, prompts, max_new_tokens):
    """Greedy decoding of the new tokens, batched with left padding, as the wrappers do."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def test_each_shipped_checkpoint_is_complete_safetensors_and_the_set_is_small():
    total = 0
    for name in SHIPPED:
        files = {p.name for p in (ASSETS / name).iterdir()}
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files, name
        assert not {"pytorch_model.bin", "model.bin"} & files, name
        total += sum(p.stat().st_size for p in (ASSETS / name).iterdir())
    assert total < 25e6, f"shipped checkpoints take {total / 1e6:.1f} MB; the package budget is 25 MB"


@pytest.mark.parametrize("name", ["tiny_blip2", "tiny_llava"])
def test_generative_checkpoints_place_image_tokens_where_the_config_expects(name, loaded):
    model, processor = loaded(name)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_token
    image = shapes.render(heldout_scenes(1)[0], 64)
    ids = processor(images=[image], text=["<image>\nhi" if name == "tiny_llava" else "hi"], return_tensors="pt")
    expected = model.config.num_query_tokens if name == "tiny_blip2" else model.config.image_seq_length
    assert int((ids["input_ids"] == image_token).sum()) == expected


def test_blip2_captions_and_answers_heldout_scenes(loaded):
    """quant_blip2's prompts: no text for captions, "Question: {q} Answer:" for VQA."""
    model, processor = loaded("tiny_blip2")
    scenes = heldout_scenes(12)
    images = [shapes.render(s, 64) for s in scenes]
    captions = generate(model, processor, images, [""] * len(images), max_new_tokens=16)
    caption_hits = [c in shapes.captions(s) for c, s in zip(captions, scenes)]
    assert sum(caption_hits) >= 11, list(zip(captions, [shapes.captions(s)[0] for s in scenes]))

    rng = random.Random("test-shipped-questions")
    items = [(i, q, a) for i, s in enumerate(scenes) for q, a, _ in shapes.vqa_questions(s, rng)]
    answers = generate(model, processor, [images[i] for i, _, _ in items],
                       [f"Question: {q} Answer:" for _, q, _ in items], max_new_tokens=4)
    accuracy = sum(pred.lower() == a for pred, (_, _, a) in zip(answers, items)) / len(items)
    assert accuracy >= 0.9, [(q, a, p) for p, (_, q, a) in zip(answers, items) if p.lower() != a]


def test_llava_captions_and_answers_through_its_chat_template(loaded):
    """quant_llava's prompts: the task's own text inside "USER: <image>\\n... ASSISTANT:"."""
    model, processor = loaded("tiny_llava")

    def chat(text):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    scenes = heldout_scenes(8)
    images = [shapes.render(s, 64) for s in scenes]
    captions = generate(model, processor, images, [chat(TASK_CAPTION_PROMPT)] * len(images), max_new_tokens=16)
    assert sum(c in shapes.captions(s) for c, s in zip(captions, scenes)) >= 7, captions

    rng = random.Random("test-shipped-questions")
    items = [(i, q, a) for i, s in enumerate(scenes) for q, a, _ in shapes.vqa_questions(s, rng)]
    answers = generate(model, processor, [images[i] for i, _, _ in items],
                       [chat(q + TASK_VQA_SUFFIX) for _, q, _ in items], max_new_tokens=4)
    accuracy = sum(pred.lower() == a for pred, (_, _, a) in zip(answers, items)) / len(items)
    assert accuracy >= 0.9, [(q, a, p) for p, (_, q, a) in zip(answers, items) if p.lower() != a]


def test_retrieval_model_finds_the_image_of_each_caption(loaded):
    """Text->image R@1 by ITC similarity over images whose captions all differ (no twins to tie)."""
    model, processor = loaded("tiny_blip2_itm")
    scenes = heldout_scenes(16, distinct=True)
    images = [shapes.render(s, 64) for s in scenes]
    texts, owner = [], []
    for i, s in enumerate(scenes):
        for caption in shapes.captions(s):
            texts.append(caption)
            owner.append(i)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        similarity = model(pixel_values=pixel_values, input_ids=enc["input_ids"],
                           attention_mask=enc["attention_mask"]).logits_per_image  # (images, texts)
    recall_at_1 = (similarity.argmax(dim=0) == torch.tensor(owner)).float().mean().item()
    assert recall_at_1 >= 0.9


def test_matching_head_prefers_the_true_caption_to_a_swapped_one(loaded):
    """ITM: "a red circle above a blue square" must beat "a red circle below a blue square"."""
    model, processor = loaded("tiny_blip2_itm")
    scenes = [s for s in heldout_scenes(40) if s.relation is not None][:16]
    images = [shapes.render(s, 64) for s in scenes]
    true = [shapes.captions(s)[0] for s in scenes]
    swapped = [t.replace(f" {s.relation} ", f" {SWAPS[s.relation]} ") for t, s in zip(true, scenes)]
    assert all(a != b for a, b in zip(true, swapped))
    pixel_values = processor(images=images + images, return_tensors="pt")["pixel_values"]
    enc = processor.tokenizer(true + swapped, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       use_image_text_matching_head=True).logits_per_image
    match = logits.softmax(dim=-1)[:, 1]
    wins = (match[: len(scenes)] > match[len(scenes):]).float().mean().item()
    assert wins >= 0.9, match
