"""The recipe: parsed once from lmms-eval model_args, validated before any model is loaded, typed parts."""

import re

import pytest

from lmms_quant.quant.awq import AWQConfig
from lmms_quant.quant.gptq import GPTQConfig
from lmms_quant.quant.recipe import CalibSource, Recipe, RecipeError, recipe_keys


def test_default_plan_is_fp16_and_quantizes_nothing():
    plan = Recipe.parse({})
    assert plan.is_noop
    assert plan.to_model_args() == {"method": "fp16"}


def test_values_as_lmms_eval_types_them():
    # lmms-eval: "4" -> int, "-1" -> float, "true" -> bool, "None" -> the string "None".
    plan = Recipe.parse({"method": "gptq", "bits": 3, "group_size": -1.0, "sym": True,
                                  "act_order": True, "damp": 0.05, "seed": "None", "calib_n": 16})
    assert (plan.method, plan.selection.llm_bits, plan.grid.granularity, plan.grid.group_size, plan.grid.sym) == (
        "gptq", 3, "channel", -1, True)
    assert plan.config == GPTQConfig(damp=0.05, act_order=True, block_size=128)
    assert (plan.calib.seed, plan.calib.n) == (0, 16)


def test_string_values_parse_like_typed_ones():
    typed = Recipe.parse({"method": "awq", "bits": 4, "group_size": 64, "awq_clip": False, "awq_grid": 10})
    strings = Recipe.parse({"method": "AWQ", "bits": "4", "group_size": "64", "awq_clip": "false",
                                     "awq_grid": "10"})
    assert typed == strings


@pytest.mark.parametrize("kwargs", [
    {"method": "rtn", "bits": 4},
    {"method": "rtn", "bits": 3, "granularity": "uniform"},
    {"method": "rtn", "component": "vit+llm", "vit_bits": 4, "llm_bits": 3, "sym": True},
    {"method": "gptq", "vit_bits": 4, "connector_bits": 8, "llm_bits": 3, "group_size": 32, "act_order": True},
    {"method": "gptq", "component": "qformer", "layer_group": "front+end", "layer_type": "mlp", "damp": 0.1},
    {"method": "awq", "bits": 2, "group_size": 64, "awq_grid": 5, "include": "lm_head", "calib_n": 32, "seed": 7},
])
def test_canonical_model_args_round_trip(kwargs):
    plan = Recipe.parse(kwargs)
    args = plan.to_model_args()
    assert all(isinstance(v, str) for v in args.values())
    again = Recipe.parse(args)
    assert again == plan
    assert again.digest() == plan.digest()
    assert re.fullmatch(r"[0-9a-f]{12}", plan.digest())


def test_equal_plans_spelled_differently_have_one_digest():
    a = Recipe.parse({"method": "rtn", "component": "qformer", "bits": 4})
    b = Recipe.parse({"method": "rtn", "component": "connector", "connector_bits": 4, "group_size": 128})
    c = Recipe.parse({"method": "rtn", "component": "connector+llm", "llm_bits": 16})
    assert a == b == c and a.digest() == c.digest()


def test_different_plans_have_different_digests():
    base = {"method": "gptq", "bits": 4}
    digests = {Recipe.parse({**base, **change}).digest() for change in (
        {}, {"bits": 3}, {"group_size": 64}, {"sym": True}, {"act_order": False}, {"component": "vit"},
        {"layer_type": "attn"}, {"calib_n": 64}, {"seed": 1}, {"damp": 0.02})}
    assert len(digests) == 10


def test_mixed_per_component_bits_like_the_paper():
    plan = Recipe.parse({"method": "gptq", "vit_bits": 4, "connector_bits": 8, "llm_bits": 3})
    assert (plan.bits_for("vit"), plan.bits_for("connector"), plan.bits_for("llm")) == (4, 8, 3)
    assert plan.selection.targets(("vit", "connector", "llm")) == ("vit", "connector", "llm")
    # 16 bits leaves a component in floating point: "16/16/4" quantizes only the LLM.
    only_llm = Recipe.parse({"method": "rtn", "vit_bits": 16, "connector_bits": 16, "llm_bits": 4})
    assert only_llm.selection.targets(("vit", "connector", "llm")) == ("llm",)


def test_component_aliases_and_combinations():
    assert Recipe.parse({"method": "rtn", "component": "qformer"}).selection.components == ("connector",)
    assert Recipe.parse({"method": "rtn", "component": "projector"}).selection.components == ("connector",)
    assert Recipe.parse({"method": "rtn", "component": "llm+vit"}).selection.components == ("vit", "llm")
    assert Recipe.parse({"method": "rtn", "component": '["vision", "lm"]'}).selection.components == ("vit", "llm")
    everything = Recipe.parse({"method": "rtn", "component": "all"})
    assert everything.selection.components == () and everything.selection.targets(("vit", "connector")) == (
        "vit", "connector")


def test_granularity_follows_group_size_unless_given():
    assert Recipe.parse({"method": "rtn"}).grid.granularity == "group"
    assert Recipe.parse({"method": "rtn", "group_size": -1}).grid.granularity == "channel"
    uniform = Recipe.parse({"method": "rtn", "granularity": "uniform"})
    assert (uniform.grid.granularity, uniform.grid.group_size) == ("tensor", -1)


# Every plan key with bad values: (model_args, the key the message must name).
BAD_PLANS = [
    ({"method": "gptqq"}, "method"),
    ({"method": 4}, "method"),
    ({"method": "rtn", "bits": 1}, "bits"),
    ({"method": "rtn", "bits": 9}, "bits"),
    ({"method": "rtn", "bits": 4.5}, "bits"),
    ({"method": "rtn", "bits": True}, "bits"),
    ({"method": "rtn", "bits": "four"}, "bits"),
    ({"method": "rtn", "bits": 16}, "bits"),  # nothing left to quantize
    ({"method": "rtn", "vit_bits": 12}, "vit_bits"),
    ({"method": "rtn", "connector_bits": 0}, "connector_bits"),
    ({"method": "rtn", "llm_bits": "x"}, "llm_bits"),
    ({"method": "rtn", "component": "vit", "llm_bits": 3}, "llm_bits"),
    ({"method": "rtn", "component": "decoder"}, "component"),
    ({"method": "rtn", "component": "vit+vit"}, "component"),
    ({"method": "rtn", "component": "all+vit"}, "component"),
    ({"method": "rtn", "component": ""}, "component"),
    ({"method": "rtn", "group_size": 0}, "group_size"),
    ({"method": "rtn", "group_size": -2}, "group_size"),
    ({"method": "rtn", "group_size": 12.5}, "group_size"),
    ({"method": "rtn", "granularity": "row"}, "granularity"),
    ({"method": "rtn", "granularity": "tensor", "group_size": 64}, "group_size"),
    ({"method": "rtn", "granularity": "group", "group_size": -1}, "group_size"),
    ({"method": "rtn", "sym": "maybe"}, "sym"),
    ({"method": "rtn", "sym": 2}, "sym"),
    ({"method": "rtn", "layer_group": "first"}, "layer_group"),
    ({"method": "rtn", "layer_type": "ffn"}, "layer_type"),
    ({"method": "rtn", "include": "embeddings"}, "include"),
    ({"method": "gptq", "damp": 0}, "damp"),
    ({"method": "gptq", "damp": 1.5}, "damp"),
    ({"method": "gptq", "damp": "nan"}, "damp"),
    ({"method": "gptq", "act_order": "sometimes"}, "act_order"),
    ({"method": "gptq", "block_size": 0}, "block_size"),
    ({"method": "awq", "awq_grid": -1}, "awq_grid"),
    ({"method": "awq", "awq_clip": "yes please"}, "awq_clip"),
    ({"method": "rtn", "damp": 0.01}, "damp"),  # a GPTQ key with another method would be ignored
    ({"method": "gptq", "awq_grid": 20}, "awq_grid"),
    ({"method": "fp16", "bits": 4}, "bits"),
    ({"method": "rtn", "calib": "/no/such/calibration.parquet"}, "calib"),
    ({"method": "rtn", "calib": "hf:only-a-path"}, "calib"),
    ({"method": "rtn", "calib": "hf:a:b:c:d"}, "calib"),
    ({"method": "rtn", "calib_n": 0}, "calib_n"),
    ({"method": "rtn", "calib_batch_size": -4}, "calib_batch_size"),
    ({"method": "rtn", "seed": -1}, "seed"),
    ({"method": "gptq", "calib_style": "prose"}, "calib_style"),
    ({"method": "gptq", "calib_style": "raw"}, "calib_style"),  # raw text reaches no vision component
    ({"method": "rtn", "report_holdout": -1}, "report_holdout"),
    ({"method": "rtn", "report_holdout": "some"}, "report_holdout"),
]


@pytest.mark.parametrize("kwargs,key", BAD_PLANS, ids=[f"{k}={kw.get(k)!r}" for kw, k in BAD_PLANS])
def test_bad_values_fail_naming_key_value_and_choices(kwargs, key):
    with pytest.raises(RecipeError) as info:
        Recipe.parse(kwargs)
    message = str(info.value)
    assert key in message
    assert repr(kwargs[key]) in message or str(kwargs[key]) in message
    assert "valid" in message


def test_unknown_key_lists_the_valid_keys_and_suggests_the_closest():
    with pytest.raises(RecipeError) as info:
        Recipe.parse({"method": "rtn", "bitz": 4}, other_valid_keys=("pretrained",))
    message = str(info.value)
    assert "'bitz'" in message and "did you mean 'bits'" in message
    assert all(key in message for key in recipe_keys()) and "pretrained" in message


def test_other_valid_keys_are_accepted_and_ignored():
    plan = Recipe.parse({"pretrained": "x", "method": "rtn"}, other_valid_keys=("pretrained",))
    assert plan.method == "rtn"


def test_calibration_sources(tmp_path):
    local = tmp_path / "calib.jsonl"
    local.write_text('{"image": "a.png", "text": "a caption"}\n')
    assert Recipe.parse({"method": "rtn", "calib": str(local)}).calib.source == CalibSource("local", str(local))
    hf = Recipe.parse({"method": "rtn", "calib": "hf:lmms-lab/COCO-Caption2017:val"})
    assert hf.calib.source == CalibSource("hf", "lmms-lab/COCO-Caption2017", None, "val")
    assert hf.to_model_args()["calib"] == "hf:lmms-lab/COCO-Caption2017:val"


def test_fp16_accepts_16_bits_but_nothing_it_would_ignore():
    assert Recipe.parse({"method": "fp16", "bits": 16, "llm_bits": "16"}).is_noop
    with pytest.raises(RecipeError, match="group_size"):
        Recipe.parse({"method": "fp16", "group_size": 64})


def test_each_method_owns_its_settings_in_a_config_dataclass():
    awq = Recipe.parse({"method": "awq", "awq_grid": 10, "awq_clip": "false"})
    assert awq.config == AWQConfig(grid=10, clip=False)
    assert Recipe.parse({"method": "rtn"}).config.to_model_args() == {}
    assert Recipe.parse({}).config is None


def test_a_recipe_matches_the_pre_refactor_spelling_and_digest():
    # Pinned from the flat QuantPlan this replaced: cache keys, run ids and report names depend on it.
    recipe = Recipe.parse({"method": "gptq", "vit_bits": 4, "connector_bits": 8, "llm_bits": 3, "group_size": 32,
                           "act_order": True})
    assert list(recipe.to_model_args().items()) == [
        ("method", "gptq"), ("component", "all"), ("vit_bits", "4"), ("connector_bits", "8"), ("llm_bits", "3"),
        ("granularity", "group"), ("group_size", "32"), ("sym", "false"), ("layer_group", "all"),
        ("layer_type", "all"), ("include", "none"), ("damp", "0.01"), ("act_order", "true"), ("block_size", "128"),
        ("calib", "synthetic"), ("calib_n", "128"), ("calib_batch_size", "8"), ("seed", "0")]
    assert recipe.digest() == "26a473740fd3"
