"""Today's VLM families on their tiny fixtures: the tables cover every Linear, a component plan
changes exactly that component's weights, GPTQ is never worse than RTN per layer, AWQ's folds are exact."""

from collections import Counter

import pytest
import torch

from lmms_quant.fixtures.families import FAMILY_BUILDERS, FAMILY_MODEL_CLASSES
from lmms_quant.processors import load_processor
from lmms_quant.quant import ArchitectureError, Recipe, quantize
from lmms_quant.quant.archs import detect_family, generic_family, resolve
from lmms_quant.quant.awq import apply_fold
from lmms_quant.quant.calibration import make_batch, sample_from_text

FAMILIES = sorted(FAMILY_BUILDERS)
FAST = {"calib_n": 4, "calib_batch_size": 4}

# Table per fixture, and its Linears per component (heads apart): 2 vision blocks, the connector,
# 2 LM blocks of 7 Linears.
EXPECTED = {
    "qwen2_5_vl": ("qwen2_5_vl", {"vit": 10, "connector": 2, "llm": 14}),
    "qwen2_vl": ("qwen2_vl", {"vit": 8, "connector": 2, "llm": 14}),
    "qwen3_vl": ("qwen3_vl", {"vit": 8, "connector": 4, "llm": 14}),  # merger + 1 DeepStack merger
    "idefics3": ("idefics3", {"vit": 12, "connector": 1, "llm": 14}),
    "smolvlm": ("smolvlm", {"vit": 12, "connector": 1, "llm": 14}),  # Idefics3's layout, its own classes
    "gemma3": ("gemma3", {"vit": 12, "connector": 1, "llm": 14}),  # the projector: a matmul weight, as a Linear
    "llava_next": ("llava_next", {"vit": 12, "connector": 2, "llm": 14}),
    "llava_onevision": ("llava_onevision", {"vit": 12, "connector": 2, "llm": 14}),
    "instructblip": ("instructblip", {"vit": 8, "connector": 25, "llm": 14}),  # Q-Former 24 with the text FF
    "internvl": ("internvl", {"vit": 12, "connector": 2, "llm": 14}),
    "paligemma": ("paligemma2", {"vit": 12, "connector": 1, "llm": 14}),
}


def load(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    return FAMILY_MODEL_CLASSES[kind].from_pretrained(path).eval(), load_processor(path)


def a_batch(processor, style, n=2, seed=5):
    from lmms_quant.fixtures.datasets import calibration_samples

    return make_batch(processor, style, [sample_from_text(s["image"], s["text"]) for s in calibration_samples(n, seed)])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch.to(model.device, model.dtype)).logits


def linears(model):
    """The model's Linears and the matmul weights its table quantizes as Linears (Gemma 3's projector)."""
    matmuls = {path for part in resolve(model).family.parts for path in (part.matmuls or {})}
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} | matmuls


def weight_key(model, name):
    """The state_dict key of a reported tensor: a Linear's weight, or the matmul weight itself."""
    return name if name in model.state_dict() else f"{name}.weight"


def test_every_family_of_the_brief_has_a_fixture():
    assert set(EXPECTED) == set(FAMILY_BUILDERS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_table_classifies_every_linear_of_the_fixture(tiny_checkpoints, kind):
    model, _ = load(tiny_checkpoints, kind)
    family, counts = EXPECTED[kind]
    arch = resolve(model)
    assert arch.family.name == family and detect_family(model).strict
    sites = [s for u in arch.units for s in u.linears]
    assert {s.name for s in sites} == linears(model)  # every Linear, each once, none outside a component
    assert len(sites) == len({s.name for s in sites})
    assert dict(Counter(s.component for u in arch.units if u.include is None for s in u.linears)) == counts
    assert all(arch.component_of(s.name) == s.component for s in sites)
    # Roles are the table's, never the fallback's "other.*".
    assert all(s.role.split(".")[0] in ("attn", "cross_attn", "mlp", "proj", "head") for s in sites)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("component", ["vit", "connector", "llm"])
def test_a_component_plan_changes_exactly_that_components_weights(tiny_checkpoints, kind, component):
    model, processor = load(tiny_checkpoints, kind)
    arch = resolve(model)
    expected = {s.name for u in arch.units if u.include is None for s in u.linears if s.component == component}
    plan = Recipe.parse({"method": "rtn", "bits": 3, "component": component, **FAST})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize(model, processor, plan, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert expected and {r.name for r in report.tensors} == expected
    assert changed == {weight_key(model, name) for name in expected}
    assert {r.component for r in report.tensors} == {component} and not report.skipped


@pytest.mark.parametrize("kind", FAMILIES)
def test_gptq_output_error_is_at_most_rtns_for_every_layer(tiny_checkpoints, kind):
    model, processor = load(tiny_checkpoints, kind)
    plan = Recipe.parse({"method": "gptq", "bits": 3, "group_size": 32, **FAST})
    report = quantize(model, processor, plan, progress=False)
    assert len(report.tensors) == sum(EXPECTED[kind][1].values()) and not report.skipped
    for record in report.tensors:
        assert record.output_error_calib <= record.rtn_output_error_calib, record.name


@pytest.mark.parametrize("kind", FAMILIES)
def test_awq_folds_with_random_scales_leave_the_fp_logits_unchanged(tiny_checkpoints, kind):
    model, processor = load(tiny_checkpoints, kind)
    arch = resolve(model)
    batch = a_batch(processor, arch.family.prompt_style)
    before = logits(model, batch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # The model's modules and the tables' Linear views of matmul weights (Gemma 3's projector)
    modules = {**dict(model.named_modules()), **{s.name: s.module for u in arch.units for s in u.linears}}
    gen = torch.Generator().manual_seed(0)
    folds = [f for u in arch.units for f in u.folds]
    for fold in folds:
        width = modules[fold.linears[0]].in_features
        apply_fold(fold, torch.rand(width, generator=gen) * 1.5 + 0.25, modules)
    after = logits(model, batch)
    # Each vision block folds at least its norms; each LM block its two norms (+ up -> down).
    assert len(folds) >= 6
    # Measured: at most 4.2e-7 (float32 rounding) with logits of magnitude ~0.6 on every fixture.
    assert torch.allclose(before, after, rtol=0, atol=2e-6), (before - after).abs().max()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(weights[k], v)}
    assert {weight_key(model, f.linears[0]) for f in folds} <= changed  # the folds did act


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_fixtures_logits_depend_on_its_vision_tower_and_connector(tiny_checkpoints, kind):
    # Otherwise a test on logits could not see what happens there (Gemma 3's projection weight is
    # initialised to zeros by transformers, which the fixture re-initialises).
    model, processor = load(tiny_checkpoints, kind)
    arch = resolve(model)
    batch = a_batch(processor, arch.family.prompt_style)
    before = logits(model, batch)
    for comp in ("vit", "connector"):
        sites = [s for u in arch.units if u.component == comp for s in u.linears if s.kind != "attn"]
        if not sites:
            continue
        with torch.no_grad():
            sites[0].module.weight.mul_(1.5)
            assert (logits(model, batch) - before).abs().max() > 1e-4, sites[0].name
            sites[0].module.weight.div_(1.5)


def test_gemma_norm_folds_divide_one_plus_weight(tiny_checkpoints):
    model, _ = load(tiny_checkpoints, "gemma3")
    folds = [f for u in resolve(model).units for f in u.folds if f.prev_name.endswith("input_layernorm")]
    assert folds and all(f.weight_offset == 1.0 for f in folds)
    norm = folds[0].prev
    w = norm.weight.detach().clone()
    s = torch.full_like(w, 2.0)
    apply_fold(folds[0], s, dict(model.named_modules()))
    assert torch.allclose(1 + norm.weight, (1 + w) / 2)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "gemma3", "internvl"])
def test_awq_quantizes_with_exact_folds_and_touches_nothing_else(tiny_checkpoints, kind):
    model, processor = load(tiny_checkpoints, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Recipe.parse({"method": "awq", "bits": 3, "group_size": 32, "awq_grid": 4, **FAST})
    report = quantize(model, processor, plan, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    targeted = {weight_key(model, r.name) for r in report.tensors}
    folded = {f"{f['prev']}.{p}" for f in report.folds for p in ("weight", "bias")}
    assert report.folds and targeted <= changed and changed - targeted <= folded


def test_a_linear_the_table_does_not_know_is_an_error_naming_it(tiny_checkpoints):
    model, _ = load(tiny_checkpoints, "qwen2_5_vl")
    model.model.visual.merger.extra = torch.nn.Linear(4, 4)  # inside the connector
    with pytest.raises(ArchitectureError, match="model.visual.merger.extra"):
        resolve(model)
    del model.model.visual.merger.extra
    model.score_head = torch.nn.Linear(4, 4)  # in no component
    with pytest.raises(ArchitectureError, match="score_head"):
        resolve(model)


def test_the_fallback_names_what_it_could_not_place(tiny_checkpoints, caplog):
    model, _ = load(tiny_checkpoints, "idefics3")
    model.score_head = torch.nn.Linear(4, 4)
    family = generic_family(model)
    assert family.unclassified == ("score_head",) and not family.strict
    with caplog.at_level("WARNING"):
        arch = resolve(model, family)
    assert "score_head" in caplog.text
    assert "score_head" not in {s.name for u in arch.units for s in u.linears}


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_fixture_loads_with_its_real_processor_and_generates_from_a_chat_prompt(tiny_checkpoints, kind):
    import json

    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints[kind]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    saved = json.loads((path / "processor_config.json").read_text())
    real_class = getattr(transformers, saved["processor_class"])
    assert isinstance(model, FAMILY_MODEL_CLASSES[kind]) and isinstance(processor, real_class)
    if "video_processor" in saved:  # written for machines with torchvision, where the full processor loads
        assert saved["video_processor"]["video_processor_type"].endswith("VideoProcessor")
    question = "what colour is the circle?"
    if resolve(model).family.prompt_style == "chat":
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert question in prompt and prompt != question
    else:  # InstructBLIP, PaliGemma: plain prompts, as their hub checkpoints
        prompt = question
    images = [[Image.new("RGB", (48, 40), (200, 30, 30))], [Image.new("RGB", (30, 50), (30, 200, 30))]]
    inputs = processor(images=images, text=[prompt, prompt + " red"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)

