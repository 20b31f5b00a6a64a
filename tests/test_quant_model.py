"""quantize on the tiny BLIP-2 (OPT, T5, ITM) and LLaVA fixtures: it does what the plan says, and proves it."""

import json
import re

import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES, build_tiny_blip2_opt
from lmms_quant.quant import RecipeError, Recipe, quantize
from lmms_quant.quant.quantizer import max_levels_per_cell

FAST = {"calib_n": 8, "calib_batch_size": 4}
COMPONENT_LINEARS = {"blip2_opt": 41, "blip2_t5": 65, "blip2_itm": 32, "llava": 28}


def load(path, kind):
    return FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def run(path, kind, evaluated=(), **plan_kwargs):
    """(model, report, names of the state_dict entries that changed)."""
    model, processor = load(path, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Recipe.parse({**FAST, **plan_kwargs})
    report = quantize(model, processor, plan, progress=False, keep_codes=True,
                            evaluated=evaluated)
    after = model.state_dict()
    return model, report, {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints):
    """(kind, method) -> (model, report, changed), 3-bit g32, computed once per module."""
    cache = {}

    def get(kind, method):
        if (kind, method) not in cache:
            cache[kind, method] = run(tiny_checkpoints[kind], kind, method=method, bits=3, group_size=32)
        return cache[kind, method]

    return get


CASES = [(k, m) for k in ("blip2_opt", "llava") for m in ("rtn", "gptq", "awq")] + [
    (k, m) for k in ("blip2_t5", "blip2_itm") for m in ("gptq", "awq")]


@pytest.mark.parametrize("kind,method", CASES)
def test_every_targeted_weight_changes_and_no_other_tensor_does(quantized, kind, method):
    model, report, changed = quantized(kind, method)
    targeted = {f"{t.name}.weight" for t in report.tensors}
    assert len(targeted) == COMPONENT_LINEARS[kind] and not report.skipped
    assert targeted <= changed
    if method == "awq":
        # AWQ also divides the norms / Linear rows it folded its scales into, and nothing else.
        folded = {f"{f['prev']}.{p}" for f in report.folds for p in ("weight", "bias")}
        assert report.folds and changed - targeted <= folded
    else:
        assert changed == targeted


@pytest.mark.parametrize("kind,method", CASES)
def test_each_group_has_at_most_2_to_the_bits_levels_and_the_codes_reproduce_it(quantized, kind, method):
    model, report, _ = quantized(kind, method)
    for record in report.tensors:
        weight = model.get_submodule(record.name).weight.detach()
        q = report.codes[record.name]
        assert max_levels_per_cell(weight, q.grid) <= 2**3 and record.max_levels <= 2**3
        s, z = q.grid.expand(q.scale, weight.shape[1]), q.grid.expand(q.zero.float(), weight.shape[1])
        assert torch.equal(weight, (q.codes.float() - z) * s), record.name
        assert record.output_error is not None and 0 < record.output_error < 1


@pytest.mark.parametrize("kind", ["blip2_opt", "llava", "blip2_t5", "blip2_itm"])
def test_gptq_output_error_on_calibration_data_is_at_most_rtns_for_every_layer(quantized, kind):
    _, report, _ = quantized(kind, "gptq")
    for record in report.tensors:
        assert record.output_error_calib <= record.rtn_output_error_calib, record.name
    # ... and by a margin overall, on the held-out batches too.
    rtn_report = quantized(kind, "rtn")[1]
    mean = lambda r: sum(t.output_error for t in r.tensors) / len(r.tensors)  # noqa: E731
    assert mean(report) < 0.9 * mean(rtn_report)


@pytest.mark.parametrize("kind", ["blip2_opt", "llava", "blip2_t5", "blip2_itm"])
def test_awq_error_is_at_most_rtns_where_its_scale_was_searched(quantized, kind):
    _, report, _ = quantized(kind, "awq")
    # Every scale is chosen on a grid holding alpha = 0 (plain RTN), by the output of the fold's parent:
    # the attention / MLP module for several Linears, the Linear itself for one.
    assert report.folds and all(f["search_loss"] <= f["search_loss_rtn"] for f in report.folds)
    parents = {f["parent"] for f in report.folds if f["criterion"] == "parent_output"}
    assert all(len(f["linears"]) > 1 for f in report.folds if f["criterion"] == "parent_output")
    if kind in ("blip2_opt", "llava", "blip2_t5"):
        assert parents  # q/k/v (and gate/up) are searched on their attention (MLP) module's output
    by_fold = {}
    for record in report.tensors:
        if record.details.get("search_criterion") != "linear_output":
            continue  # a parent-searched scale trades the Linears' own errors for the parent's
        norm = record.details["calib_output_norm"]
        key = record.details["fold_from"]
        awq_sq, rtn_sq = by_fold.get(key, (0.0, 0.0))
        by_fold[key] = (awq_sq + (record.output_error_calib * norm) ** 2,
                        rtn_sq + (record.rtn_output_error_calib * norm) ** 2)
    for key, (awq_sq, rtn_sq) in by_fold.items():
        # Float tolerance: a Linear whose rows a later fold divided is RTN'd in those units.
        assert awq_sq <= rtn_sq * (1 + 1e-5), key


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_same_seed_gives_bit_identical_weights_and_tensor_records(tiny_checkpoints, method):
    first, first_report, _ = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method=method, bits=4, group_size=32,
                                 seed=3)
    second, second_report, _ = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method=method, bits=4,
                                   group_size=32, seed=3)
    other, _, _ = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method=method, bits=4, group_size=32, seed=4)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed picks the calibration samples
    # Every per-tensor figure repeats (timings live in the report's totals only).
    assert first_report.tensors == second_report.tensors
    assert first_report.timing["report_stats_s"] > 0


# --------------------------------------------------------------------------- selection

# Written from the module names alone, independently of the architecture tables.
STACKS = {
    "vit": re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."),
    "connector": re.compile(r"^qformer\.encoder\.layer\.(\d+)\."),
    "llm": re.compile(r"^language_model\.model\.decoder\.layers\.(\d+)\."),
}
NON_BLOCK = {"connector": ["language_projection"], "vit": [], "llm": []}
THIRDS_OF_3 = {"front": {0}, "middle": {1}, "end": {2}, "all": {0, 1, 2}}


def expected_weights(model, component, layer_group, layer_type):
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        match = STACKS[component].match(name)
        if match:
            is_attn = any(w in name for w in ("self_attn", "attention"))
            if int(match.group(1)) in THIRDS_OF_3[layer_group] and layer_type in ("all", "attn" if is_attn else "mlp"):
                names.add(f"{name}.weight")
        elif name in NON_BLOCK[component] and layer_group == "all" and layer_type == "all":
            names.add(f"{name}.weight")
    return names


@pytest.fixture(scope="module")
def blip2_three_layers(tmp_path_factory):
    return build_tiny_blip2_opt(tmp_path_factory.mktemp("blip2_3l") / "model", seed=0, num_layers=3)


@pytest.mark.parametrize("layer_type", ["attn", "mlp", "all"])
@pytest.mark.parametrize("layer_group", ["front", "middle", "end", "all"])
@pytest.mark.parametrize("component", ["vit", "connector", "llm"])
def test_component_layer_group_and_layer_type_touch_exactly_their_weights(
        blip2_three_layers, component, layer_group, layer_type):
    model, report, changed = run(blip2_three_layers, "blip2_opt", method="rtn", bits=4, calib_n=4,
                                 component=component, layer_group=layer_group, layer_type=layer_type)
    expected = expected_weights(model, component, layer_group, layer_type)
    assert expected and changed == expected
    assert {r.component for r in report.tensors} == {component}


@pytest.mark.parametrize("component,prefixes", [
    ("vit", ("model.vision_tower.",)),
    ("connector", ("model.multi_modal_projector.",)),
    ("llm", ("model.language_model.",)),
    ("vit+llm", ("model.vision_tower.", "model.language_model.")),
])
def test_llava_components_touch_only_their_tensors(tiny_checkpoints, component, prefixes):
    model, report, changed = run(tiny_checkpoints["llava"], "llava", method="rtn", component=component)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert changed == {n for n in linears if n.startswith(prefixes)}


def test_mixed_bits_per_component(tiny_checkpoints):
    _, report, _ = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method="rtn", vit_bits=2, connector_bits=8,
                       llm_bits=16)
    bits = {r.component: r.bits for r in report.tensors}
    assert bits == {"vit": 2, "connector": 8}
    assert max(r.max_levels for r in report.tensors if r.component == "vit") <= 4


# --------------------------------------------------------------------------- size accounting


def test_bits_per_weight_match_a_hand_computation(tiny_checkpoints):
    # LLaVA projector: two 64x64 Linears with biases; the checkpoint is fp32. Unquantized parameters
    # count at the 16-bit baseline (as the paper counts), and at their stored 32 bits beside it.
    _, channel, _ = run(tiny_checkpoints["llava"], "llava", method="rtn", bits=4, group_size=-1, component="connector")
    # per channel, asymmetric: 4 bits x 4096 + 64 rows x (16-bit scale + 4-bit zero), twice; biases 2 x 64.
    quantized = 2 * (4 * 4096 + 64 * (16 + 4))
    bits = quantized + 2 * 64 * 16
    connector = channel.components["connector"]
    assert (connector.params, connector.quantized_params, connector.bits) == (8320, 8192, bits)
    assert connector.bits_per_weight == pytest.approx(37376 / 8320)
    assert connector.size_bytes == 4672
    assert connector.stored_bits == quantized + 2 * 64 * 32 == 39424
    assert channel.total.bits == (channel.total.params - 8320) * 16 + bits
    assert channel.total.stored_bits == (channel.total.params - 8320) * 32 + 39424
    vit = channel.components["vit"].to_dict()
    assert (vit["bits_per_weight"], vit["stored_bits_per_weight"], vit["bpw_baseline"]) == (16.0, 32.0, 16)

    _, grouped, _ = run(tiny_checkpoints["llava"], "llava", method="rtn", bits=4, group_size=32, sym=True,
                        component="connector")
    # groups of 32, symmetric: 4 bits x 4096 + 64 rows x 2 groups x 16-bit scale (no zero-point), twice.
    assert grouped.components["connector"].bits == 2 * (4 * 4096 + 64 * 2 * 16) + 2 * 64 * 16 == 38912
    assert grouped.components["connector"].bits_per_weight == pytest.approx(38912 / 8320)


def test_fp16_plan_quantizes_nothing_and_sizes_the_model(tiny_checkpoints):
    model, report, changed = run(tiny_checkpoints["llava"], "llava", method="fp16", calib_n=None,
                                 calib_batch_size=None)
    assert not changed and not report.tensors
    assert report.total.params == sum(p.numel() for p in model.parameters())
    assert report.total.bits_per_weight == 16.0 and report.total.to_dict()["stored_bits_per_weight"] == 32.0  # fp32 checkpoint


def test_tied_lm_head_is_quantized_only_when_asked_and_counted_once(tiny_checkpoints):
    _, default, changed = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method="rtn", component="llm")
    assert "language_model.lm_head.weight" not in changed
    _, report, changed = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method="gptq", component="llm",
                             include="lm_head")
    embed = "language_model.model.decoder.embed_tokens.weight"
    assert {"language_model.lm_head.weight", embed} <= changed  # tied: the embeddings change with it
    assert report.tensor("language_model.lm_head").tied_to == [embed]
    llm = report.components["llm"]
    assert llm.quantized_params == default.components["llm"].quantized_params + 400 * 64
    assert llm.params == default.components["llm"].params


# --------------------------------------------------------------------------- calibration


def test_a_layer_that_gets_no_calibration_data_is_skipped_not_zeroed(tiny_checkpoints):
    model, processor = load(tiny_checkpoints["blip2_opt"], "blip2_opt")
    silent = model.get_submodule("vision_model.encoder.layers.1.mlp.fc2")
    original = silent.weight.detach().clone()
    silent.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    report = quantize(model, processor, Recipe.parse({"method": "gptq", "component": "vit", **FAST}),
                            progress=False)
    assert [s["name"] for s in report.skipped] == ["vision_model.encoder.layers.1.mlp.fc2"]
    assert "zero" in report.skipped[0]["reason"]
    assert torch.equal(silent.weight, original)
    assert len(report.tensors) == 7


def test_calibrating_on_an_evaluated_split_is_refused_before_anything_changes(tiny_checkpoints, data_root):
    coco = data_root / "coco2017_cap_val" / "val.parquet"
    model, processor = load(tiny_checkpoints["blip2_opt"], "blip2_opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for evaluated in ([(str(coco), None, "val")], [(str(data_root / "coco2017_cap_val"), None, "val")]):
        with pytest.raises(RecipeError, match="evaluated split"):
            quantize(model, processor, Recipe.parse({"method": "rtn", "calib": str(coco), **FAST}),
                           evaluated=evaluated, progress=False)
    with pytest.raises(RecipeError, match="evaluated split"):
        quantize(model, processor, Recipe.parse({"method": "rtn", "calib": "hf:lmms-lab/COCO:val"}),
                       evaluated=[("lmms-lab/COCO", None, "val")], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_from_a_local_parquet_file(tiny_checkpoints, data_root):
    vqa = data_root / "vqav2_val" / "validation.parquet"
    _, report, changed = run(tiny_checkpoints["llava"], "llava", method="gptq", component="llm", calib=str(vqa),
                             calib_n=4, evaluated=[(str(data_root / "coco2017_cap_val"), None, "val")])
    assert report.calibration["source"] == str(vqa) and len(report.tensors) == 14
    with pytest.raises(RecipeError, match="samples but"):
        run(tiny_checkpoints["llava"], "llava", method="gptq", calib=str(vqa), calib_n=10_000)


def test_report_json_is_complete_and_written_atomically(quantized, tmp_path):
    _, report, _ = quantized("blip2_opt", "gptq")
    path = tmp_path / "out" / "quant_report.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["quant_report.json"]
    assert data["plan"] == Recipe.parse(data["plan"]).to_model_args()
    assert data["plan_digest"] == report.digest and data["n_quantized_tensors"] == 41
    assert set(data["components"]) == {"vit", "connector", "llm"}
    tensor = data["tensors"][0]
    for key in ("name", "component", "block", "role", "method", "bits", "group_size", "max_levels", "weight_error",
                "output_error", "output_error_calib", "rtn_output_error_calib"):
        assert key in tensor
    assert data["total"]["bits_per_weight"] < 32 and data["calibration"]["holdout_samples"] == 8


def test_report_holdout_sets_the_held_out_samples_and_zero_runs_no_held_out_pass(tiny_checkpoints):
    model, processor = load(tiny_checkpoints["blip2_opt"], "blip2_opt")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    report = quantize(model, processor, Recipe.parse({"method": "rtn", "report_holdout": 0, **FAST}), progress=False)
    assert calls == [] and report.calibration["holdout_samples"] == 0  # RTN needs no data, and none was asked
    assert len(report.tensors) == 41 and all(t.output_error is None for t in report.tensors)
    _, three, _ = run(tiny_checkpoints["blip2_opt"], "blip2_opt", method="rtn", report_holdout=3)
    assert three.calibration["holdout_samples"] == 3 and all(t.output_error is not None for t in three.tensors)
    assert three.plan["report_holdout"] == "3"


def test_linears_sharing_an_input_share_one_hessian_and_keep_their_codes(tiny_checkpoints, monkeypatch):
    from lmms_quant.quant import gptq

    _, stacked, _ = run(tiny_checkpoints["llava"], "llava", method="gptq", bits=3, group_size=32)
    block = "model.language_model.layers.0"
    q = stacked.tensor(f"{block}.self_attn.q_proj")
    assert set(q.details["quantized_with"]) == {f"{block}.self_attn.k_proj", f"{block}.self_attn.v_proj"}
    assert stacked.tensor(f"{block}.mlp.gate_proj").details["quantized_with"] == [f"{block}.mlp.up_proj"]
    assert "quantized_with" not in stacked.tensor(f"{block}.mlp.down_proj").details
    # One Linear at a time on the same Hessians: the same codes and the same calibration errors.
    monkeypatch.setattr(gptq, "_stackable", lambda targets, stats: [[t] for t in targets])
    _, alone, _ = run(tiny_checkpoints["llava"], "llava", method="gptq", bits=3, group_size=32)
    for name, codes in alone.codes.items():
        assert torch.equal(codes.codes, stacked.codes[name].codes), name
    for a, b in zip(alone.tensors, stacked.tensors):
        assert a.output_error_calib == pytest.approx(b.output_error_calib, rel=1e-6)


def test_per_tensor_gptq_keeps_one_scale_per_linear_where_linears_share_an_input(tiny_checkpoints):
    _, report, _ = run(tiny_checkpoints["llava"], "llava", method="gptq", bits=4, granularity="tensor",
                       component="llm")
    block = "model.language_model.layers.0.self_attn"
    scales = [report.codes[f"{block}.{p}"].scale for p in ("q_proj", "k_proj", "v_proj")]
    assert all(s.shape == (1, 1) for s in scales) and len({float(s) for s in scales}) == 3
    assert all("quantized_with" not in t.details for t in report.tensors)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_records_weight_error_is_the_written_weight_against_the_original(tiny_checkpoints, method):
    # Records are taken against the modules' weights before the results are written (no copy is kept),
    # so a method must hand the modules back as it found them; then these are the true errors.
    model, processor = load(tiny_checkpoints["blip2_opt"], "blip2_opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize(model, processor, Recipe.parse({**FAST, "method": method, "bits": 3, "group_size": 32}),
                      progress=False)
    after = model.state_dict()
    for t in report.tensors:
        w0, w1 = before[f"{t.name}.weight"].double(), after[f"{t.name}.weight"].double()
        assert t.weight_error == pytest.approx(float((w0 - w1).norm() / w0.norm()), rel=1e-5)
        assert t.weight_error > 0
