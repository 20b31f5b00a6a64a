"""Architecture tables: they cover every Linear of each component, and their AWQ folds are exact."""

from collections import Counter

import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant import RecipeError, Recipe
from lmms_quant.quant.archs import (BLIP2_OPT, LLAVA, ArchitectureError, generic_family, resolve, select, third_of)
from lmms_quant.quant.awq import apply_fold
from lmms_quant.quant.calibration import CalibSample, make_batch

KINDS = ("blip2_opt", "blip2_t5", "blip2_itm", "llava")


def load(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    return FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch.to(model.device, model.dtype))
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def a_batch(processor, style):
    from lmms_quant.fixtures.datasets import calibration_samples

    from lmms_quant.quant.calibration import sample_from_text

    return make_batch(processor, style, [sample_from_text(s["image"], s["text"]) for s in calibration_samples(4, 5)])


# nn.Linear counts per component in the tiny fixtures (offline-fixtures notes §2), heads apart.
EXPECTED_COUNTS = {
    "blip2_opt": {"vit": 8, "connector": 21, "llm": 12},
    "blip2_t5": {"vit": 8, "connector": 21, "llm": 36},
    "blip2_itm": {"vit": 8, "connector": 24},
    "llava": {"vit": 12, "connector": 2, "llm": 14},
}


@pytest.mark.parametrize("kind", KINDS)
def test_tables_cover_every_linear_of_each_component(tiny_checkpoints, kind):
    model, _ = load(tiny_checkpoints, kind)
    arch = resolve(model)
    counts = Counter(site.component for unit in arch.units if unit.include is None for site in unit.linears)
    assert dict(counts) == EXPECTED_COUNTS[kind]
    heads = [site.name for unit in arch.units if unit.include == "lm_head" for site in unit.linears]
    assert heads == ({"blip2_opt": ["language_model.lm_head"], "blip2_t5": ["language_model.lm_head"],
                      "llava": ["lm_head"]}.get(kind, []))
    # Nothing that is not a Linear weight is ever a target: embeddings, patch conv, norms.
    names = {site.name for unit in arch.units for site in unit.linears}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.Conv2d, torch.nn.LayerNorm)):
            assert name not in names


@pytest.mark.parametrize("kind", KINDS)
def test_every_awq_fold_in_the_tables_leaves_the_fp_model_unchanged(tiny_checkpoints, kind):
    model, processor = load(tiny_checkpoints, kind)
    arch = resolve(model)
    batch = a_batch(processor, arch.family.prompt_style)
    before = outputs(model, batch)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    n_folds = 0
    for unit in arch.units:
        for fold in unit.folds:
            width = modules[fold.linears[0]].in_features
            apply_fold(fold, torch.rand(width, generator=gen) * 1.5 + 0.25, modules)
            n_folds += 1
    after = outputs(model, batch)
    assert n_folds >= {"blip2_opt": 16, "blip2_t5": 22, "blip2_itm": 10, "llava": 12}[kind]
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    # ... while the weights did change: the test would catch a fold that is not exact.
    assert not torch.equal(modules[arch.units[0].folds[0].linears[0]].weight, load(tiny_checkpoints, kind)[0]
                           .get_submodule(arch.units[0].folds[0].linears[0]).weight)


def test_inexact_folds_are_not_in_the_tables(tiny_checkpoints):
    llava, _ = load(tiny_checkpoints, "llava")
    units = resolve(llava).units
    llm = [u for u in units if u.stack == "model.language_model.layers"]
    # Grouped-query attention: v_proj is narrower than o_proj's input, so v -> o cannot fold.
    assert all(any("widths differ" in d for d in u.dropped_folds) for u in llm)
    assert all(not any(f.prev_name.endswith("v_proj") for f in u.folds) for u in llm)
    # CLIP's fc1 -> fc2 passes through GELU; the Q-Former's post-LN norms are not fold sources.
    assert not any(f.prev_name.endswith("mlp.fc1") for u in units for f in u.folds)
    blip2, _ = load(tiny_checkpoints, "blip2_opt")
    qformer = [f for u in resolve(blip2).units if u.stack == "qformer.encoder.layer" for f in u.folds]
    assert qformer and all(f.prev_name.endswith(".value") for f in qformer)


def test_llava_last_vision_block_is_flagged_as_unused(tiny_checkpoints):
    model, _ = load(tiny_checkpoints, "llava")
    assert model.config.vision_feature_layer == -2
    vision = [u for u in resolve(model).units if u.component == "vit"]
    assert [all(s.feeds_output for s in u.linears) for u in vision] == [True, False]


@pytest.mark.parametrize("kind", KINDS)
def test_generic_detector_finds_the_same_weights_as_the_table(tiny_checkpoints, kind):
    model, _ = load(tiny_checkpoints, kind)

    def layout(arch):
        return sorted((s.component, s.name, s.kind, u.include) for u in arch.units for s in u.linears)

    assert layout(resolve(model, generic_family(model))) == layout(resolve(model))


def test_a_table_that_does_not_match_the_model_fails_loudly(tiny_checkpoints):
    model, _ = load(tiny_checkpoints, "llava")
    with pytest.raises(ArchitectureError, match="vision_model.encoder.layers"):
        resolve(model, BLIP2_OPT)
    blip2, _ = load(tiny_checkpoints, "blip2_opt")
    with pytest.raises(ArchitectureError):
        resolve(blip2, LLAVA)


def test_layer_groups_are_the_papers_thirds():
    def sizes(n):
        return Counter(third_of(i, n) for i in range(n))

    assert sizes(39) == {"front": 13, "middle": 13, "end": 13}  # ViT-g: 0-12 / 13-25 / 26-38
    assert sizes(32) == {"front": 10, "middle": 11, "end": 11}  # OPT-2.7b: 0-9 / 10-20 / 21-31
    assert sizes(12) == {"front": 4, "middle": 4, "end": 4}
    assert [third_of(i, 2) for i in range(2)] == ["middle", "end"]  # 2 // 3 == 0 front blocks


@pytest.mark.parametrize("kind,kwargs,fragment", [
    ("llava", {"component": "connector", "layer_group": "front"}, "selects no weight"),
    ("llava", {"component": "connector", "layer_type": "attn"}, "selects no weight"),
    ("blip2_itm", {"component": "llm"}, "has no llm"),
    ("blip2_itm", {"include": "lm_head"}, "has no lm_head"),
    ("blip2_opt", {"component": "vit", "include": "lm_head"}, "not quantized"),
    ("blip2_opt", {"component": "llm", "layer_group": "front"}, "selects no weight"),  # 2 blocks: no front third
])
def test_selectors_that_match_nothing_are_errors(tiny_checkpoints, kind, kwargs, fragment):
    model, _ = load(tiny_checkpoints, kind)
    plan = Recipe.parse({"method": "rtn", **kwargs})
    with pytest.raises(RecipeError, match=fragment):
        select(resolve(model), plan, model)


def test_all_components_with_attention_only_skips_the_projector_quietly(tiny_checkpoints):
    model, _ = load(tiny_checkpoints, "llava")
    units = select(resolve(model), Recipe.parse({"method": "rtn", "layer_type": "attn"}), model)
    roles = {t.site.role.split(".")[0] for u in units for t in u.targets}
    components = {t.site.component for u in units for t in u.targets}
    assert roles == {"attn"} and components == {"vit", "llm"}


def test_calibration_sample_formats_per_family(tiny_checkpoints):
    from PIL import Image

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    samples = [CalibSample(image, "what colour is the circle?", "red"), CalibSample(image, None, "a red circle")]
    _, t5 = load(tiny_checkpoints, "blip2_t5")
    batch = make_batch(t5, "blip2_seq2seq", samples)
    answers = t5.tokenizer.batch_decode(batch.inputs["labels"].clamp(min=0), skip_special_tokens=True)
    assert [a.replace(" ", "") for a in answers] == ["red", "aredcircle"]
    assert batch.masks["decoder_mask"].shape == batch.inputs["labels"].shape
    _, llava = load(tiny_checkpoints, "llava")
    batch = make_batch(llava, "llava", samples)
    text = llava.tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=False)
    assert "ASSISTANT:" in text[0] and "what colour is the circle?" in text[0]
