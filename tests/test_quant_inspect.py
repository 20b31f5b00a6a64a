"""`lmms-quant inspect`: components and the exact tensors a plan would quantize, from the config alone."""

import json
from types import SimpleNamespace

import pytest
import torch

from lmms_quant.fixtures.families import FAMILY_BUILDERS, FAMILY_MODEL_CLASSES
from lmms_quant.quant import Recipe
from lmms_quant.quant.archs import resolve
from lmms_quant.quant.inspect import inspect_model, load_model, main, render_text

SCHEMA_KEYS = {"schema", "model", "components", "other", "unclassified", "notes", "plan", "targets", "folds",
               "dropped_folds", "sizes"}


def meta_model(path):
    """What `lmms-quant inspect` builds for a wrapper without its own class (AutoModelForImageTextToText)."""
    return load_model(SimpleNamespace(model_class=None),
                      SimpleNamespace(pretrained=str(path), trust_remote_code=False, dtype="auto"))


@pytest.mark.parametrize("kind", sorted(FAMILY_BUILDERS))
def test_inspect_places_every_linear_and_lists_a_plans_exact_targets(tiny_checkpoints, kind):
    model = meta_model(tiny_checkpoints[kind])
    assert all(p.device.type == "meta" for p in model.parameters())  # no weight was read
    real = FAMILY_MODEL_CLASSES[kind].from_pretrained(tiny_checkpoints[kind])
    modules = {n for n, m in real.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == modules
    # and the matmul weights the table quantizes as Linears (Gemma 3's projector)
    linears = modules | {path for part in resolve(real).family.parts for path in (part.matmuls or {})}

    plan = Recipe.parse({"method": "rtn", "bits": 3, "llm_bits": 5})
    doc = json.loads(json.dumps(inspect_model(model, resolve(model), plan, model_id="quant_hf")))
    assert set(doc) == SCHEMA_KEYS and doc["schema"] == "lmms-quant-inspect/1"
    assert doc["model"]["table"] and not doc["unclassified"]
    placed = {h for c in doc["components"].values() for h in c["heads"]} | set(doc["other"]["linears"])
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) | placed == linears and not set(targets) & placed
    assert not doc["other"]["linears"]  # these families have no task heads outside the components
    assert sum(c["linears"] for c in doc["components"].values()) == len(linears)
    for t in targets.values():
        assert t["bits"] == (5 if t["component"] == "llm" else 3)
        weight = real.get_submodule(t["name"]).weight if t["name"] in modules else real.get_parameter(t["name"]).T
        assert t["shape"] == list(weight.shape)
    total = sum(p.numel() for p in real.parameters())
    assert doc["sizes"]["total"]["params"] == total
    assert doc["sizes"]["total"]["quantized_params"] == sum(t["parameters"] for t in targets.values())
    text = render_text(doc)
    assert all(name in text for name in targets)


def test_inspect_lists_gemma3s_matmul_projection_as_the_connectors_target(tiny_checkpoints):
    model = meta_model(tiny_checkpoints["gemma3"])
    doc = inspect_model(model, resolve(model), Recipe.parse({"method": "rtn", "bits": 3, "component": "connector",
                                                              "granularity": "channel"}))
    name = "model.multi_modal_projector.mm_input_projection_weight"
    # (vision hidden 32, text hidden 64) stored; quantized as the Linear it computes: 64 x 32
    assert [(t["name"], t["component"], t["shape"], t["bits"]) for t in doc["targets"]] == [
        (name, "connector", [64, 32], 3)]
    assert doc["components"]["connector"]["linears"] == 1 and not doc["notes"]
    # 2048 weights at 3 bits, one fp16 scale and a 3-bit zero per output row (64), the norm's 32 at 16 bits
    assert doc["sizes"]["connector"]["bits_per_weight"] == (2048 * 3 + 64 * (16 + 3) + 32 * 16) / (2048 + 32)
    assert name in render_text(doc)


def test_the_cli_prints_json_for_a_wrapper_id_and_plan(tiny_checkpoints, capsys):
    path = tiny_checkpoints["llava"]
    code = main(["--model", "quant_llava", "--model_args",
                 f"pretrained={path},method=awq,bits=3,component=vit+llm,layer_type=mlp", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == {"id": "quant_llava", "pretrained": str(path), "class": "LlavaForConditionalGeneration",
                            "family": "llava", "table": True, "prompt_style": "llava"}
    assert {t["component"] for t in doc["targets"]} == {"vit", "llm"}
    assert {t["role"].split(".")[0] for t in doc["targets"]} == {"mlp"}
    assert len(doc["targets"]) == 2 * 2 + 2 * 3  # fc1/fc2 per CLIP block, gate/up/down per Llama block
    assert doc["folds"] and all(f["linears"][0] in {t["name"] for t in doc["targets"]} for f in doc["folds"])
    assert doc["components"]["vit"]["stacks"] == [
        {"path": "model.vision_tower.encoder.layers", "blocks": 2, "linears_per_block": 6}]


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "quant_nope", "--model_args", "pretrained=x"], "quant_blip2"),
    (["--model", "quant_llava", "--model_args", "pretrained=x,bitz=4"], "bitz"),
    (["--model", "quant_llava", "--model_args", "method=rtn"], "pretrained"),
])
def test_bad_input_fails_before_loading_with_the_valid_choices(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_a_selector_that_matches_nothing_is_an_error(tiny_checkpoints, capsys):
    path = tiny_checkpoints["blip2_opt"]
    assert main(["--model", "quant_blip2", "--model_args", f"pretrained={path},method=rtn,component=llm,"
                 "layer_group=front"]) == 2
    assert "selects no weight" in capsys.readouterr().err


def test_a_wrapper_whose_class_is_an_auto_class_builds_the_same_model(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints["qwen2_5_vl"]
    args = SimpleNamespace(pretrained=str(path), trust_remote_code=False, dtype="auto")
    auto = load_model(SimpleNamespace(model_class=AutoModelForImageTextToText), args)
    concrete = load_model(SimpleNamespace(model_class=FAMILY_MODEL_CLASSES["qwen2_5_vl"]), args)
    assert type(auto) is type(concrete)
    assert [n for n, _ in auto.named_parameters()] == [n for n, _ in concrete.named_parameters()]
