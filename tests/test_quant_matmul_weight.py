"""Gemma 3's connector: ``mm_input_projection_weight`` P (vision hidden x text hidden), applied with
torch.matmul, quantized by every method as the Linear it computes (weight P.T), reported, counted,
cached, saved and exported under its own state_dict key."""

import pytest
import torch

from lmms_quant.fixtures.families import FAMILY_MODEL_CLASSES
from lmms_quant.processors import load_processor
from lmms_quant.quant import Recipe, quantize
from lmms_quant.quant.calibration import make_batch, sample_from_text

P = "model.multi_modal_projector.mm_input_projection_weight"
NORM = "model.multi_modal_projector.mm_soft_emb_norm.weight"
FAST = {"calib_n": 4, "calib_batch_size": 4}


def load(tiny_checkpoints):
    path = tiny_checkpoints["gemma3"]
    return FAMILY_MODEL_CLASSES["gemma3"].from_pretrained(path).eval(), load_processor(path)


def run(model, processor, **args):
    return quantize(model, processor, Recipe.parse({**args, **FAST}), progress=False, keep_codes=True)


def logits(model, processor):
    from lmms_quant.fixtures.datasets import calibration_samples

    samples = [sample_from_text(s["image"], s["text"]) for s in calibration_samples(2, 5)]
    with torch.no_grad():
        return model(**make_batch(processor, "chat", samples).to("cpu", model.dtype)).logits


@pytest.mark.parametrize("method,also_changed", [("rtn", set()), ("gptq", set()), ("awq", {NORM})])
def test_component_connector_changes_the_projection_weight_and_nothing_else(tiny_checkpoints, method, also_changed):
    model, processor = load(tiny_checkpoints)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run(model, processor, method=method, bits=3, group_size=16, component="connector")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    # AWQ also divides the (1 + w) RMSNorm in front of it (the fold), nothing else
    assert changed == {P} | also_changed
    (record,) = report.tensors
    assert (record.name, record.component, record.method, record.bits, record.shape) == (P, "connector", method, 3,
                                                                                          (64, 32))
    assert [f["prev"] for f in report.folds] == (["model.multi_modal_projector.mm_soft_emb_norm"] if also_changed
                                                 else [])


def test_rtn_codes_have_at_most_2_to_the_b_levels_per_group_along_the_input_axis(tiny_checkpoints):
    model, processor = load(tiny_checkpoints)
    fp = model.get_parameter(P).detach().clone()
    run(model, processor, method="rtn", bits=3, group_size=16, component="connector")
    quantized = model.get_parameter(P).detach()
    # Groups are 16 consecutive input features (P's first axis) of one output feature (P's column).
    groups = quantized.T.reshape(64, 2, 16).reshape(128, 16)
    levels = [len(torch.unique(g)) for g in groups]
    assert max(levels) <= 8 and max(levels) >= 6
    # Each group is its min-max asymmetric 3-bit grid: reproduced here from the FP weight.
    w = fp.T.reshape(128, 16)
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 7
    zero = torch.round(-lo / scale)
    expected = (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero) * scale
    assert torch.equal(groups, expected)


def test_gptq_error_on_the_projection_is_at_most_rtns_on_the_calibration_inputs(tiny_checkpoints):
    model, processor = load(tiny_checkpoints)
    report = run(model, processor, method="gptq", bits=3, group_size=16, component="connector")
    (record,) = report.tensors
    assert record.name == P and record.output_error_calib < record.rtn_output_error_calib


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_outputs_equal_those_of_the_projection_replaced_by_its_codes_by_hand(tiny_checkpoints, method):
    quantized, processor = load(tiny_checkpoints)
    report = run(quantized, processor, method=method, bits=4, group_size=16, component="connector")
    by_hand, _ = load(tiny_checkpoints)
    q = report.codes[P]  # in the Linear's orientation: (text hidden, vision hidden)
    s, z = q.grid.expand(q.scale, 32), q.grid.expand(q.zero.float(), 32)
    with torch.no_grad():
        by_hand.get_parameter(P).copy_(((q.codes.float() - z) * s).T)
        for name, tensor in quantized.state_dict().items():  # AWQ's folded norm, as the run left it
            if name != P:
                by_hand.state_dict()[name].copy_(tensor)
    assert torch.equal(logits(quantized, processor), logits(by_hand, processor))
    fp, _ = load(tiny_checkpoints)
    assert not torch.equal(logits(fp, processor), logits(quantized, processor))


def test_the_projection_counts_at_its_bits_in_linear_orientation(tiny_checkpoints):
    model, processor = load(tiny_checkpoints)
    report = run(model, processor, method="rtn", bits=4, granularity="channel", sym=True, component="connector")
    connector = report.sizes["connector"]
    # 2048 weights at 4 bits + one fp16 scale per output feature (64; P's columns), the norm's 32 at 16
    assert (connector.params, connector.quantized_params, connector.bits) == (2080, 2048, 2048 * 4 + 64 * 16 + 32 * 16)


def test_the_weight_cache_restores_the_projection(tiny_checkpoints, tmp_path):
    args = dict(method="gptq", bits=3, group_size=16, component="connector", **FAST)
    first, processor = load(tiny_checkpoints)
    miss = quantize(first, processor, Recipe.parse(args), cache=tmp_path, progress=False)
    second, _ = load(tiny_checkpoints)
    hit = quantize(second, processor, Recipe.parse(args), cache=tmp_path, progress=False)
    assert (miss.weight_cache["hit"], hit.weight_cache["hit"]) == (False, True)
    assert torch.equal(first.get_parameter(P), second.get_parameter(P))
    assert not torch.equal(second.get_parameter(P), load(tiny_checkpoints)[0].get_parameter(P))


def test_a_saved_run_names_the_codes_by_the_key_and_reads_them_back(tiny_checkpoints, tmp_path):
    from lmms_quant.quant.saved import read_saved_run, write_saved_run

    model, processor = load(tiny_checkpoints)
    report = run(model, processor, method="rtn", bits=4, group_size=16, component="connector+llm")
    write_saved_run(model, processor, report, tmp_path / "saved")
    saved = read_saved_run(tmp_path / "saved")
    assert set(saved.codes) == set(report.codes) and P in saved.codes
    assert torch.equal(saved.codes[P].codes, report.codes[P].codes)
    assert torch.equal(saved.model.get_parameter(P), model.get_parameter(P))


def test_the_export_writes_the_projection_dense_and_it_reloads_bit_for_bit(tiny_checkpoints, tmp_path):
    pytest.importorskip("compressed_tensors")
    from lmms_quant.quant.export import export_run, load_exported

    model, processor = load(tiny_checkpoints)
    report = run(model, processor, method="gptq", bits=4, group_size=16, sym=True, component="connector+llm")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    data = export_run(model, processor, report, tmp_path / "export")
    assert data["export"]["dense_quantized"] == [P]
    assert any(P in note and "dense" in note for note in data["notes"])
    back = load_exported(tmp_path / "export")
    state = back.state_dict()
    assert torch.equal(state[P], expected[P])
    differ = [k for k in expected if not torch.equal(state[k].to(expected[k].dtype), expected[k])]
    assert differ == []


def test_an_export_of_the_projection_alone_is_refused_with_the_reason(tiny_checkpoints, tmp_path):
    pytest.importorskip("compressed_tensors")
    from lmms_quant.quant.export import ExportError, export_run

    model, processor = load(tiny_checkpoints)
    report = run(model, processor, method="rtn", bits=4, group_size=16, component="connector")
    with pytest.raises(ExportError, match="nothing to pack.*mm_input_projection_weight"):
        export_run(model, processor, report, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_linear_view_follows_the_parameter_when_the_model_is_moved(tiny_checkpoints):
    from lmms_quant.quant.archs import resolve

    model, _ = load(tiny_checkpoints)
    (view,) = [s.module for u in resolve(model).units for s in u.linears if s.name == P]
    model.to(torch.float64)  # new storage for every parameter, as model.to(device) before quantizing
    with torch.no_grad():
        view.weight.mul_(2)
    assert view.weight.dtype == torch.float64 and torch.equal(view.weight, model.get_parameter(P).T)
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.allclose(view(x), x @ model.get_parameter(P))
