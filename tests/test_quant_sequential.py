"""The sequential driver gives the model driver's statistics, bit for bit, with O(depth) block forwards."""

import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES, build_tiny_blip2_opt
from lmms_quant.quant import Recipe
from lmms_quant.quant.api import run_quantization

RECIPE = {"bits": 3, "group_size": 32, "calib_n": 8, "calib_batch_size": 4, "report_holdout": 4}


def _quantize(path, kind, method, driver, **extra):
    model = FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).eval()
    report = run_quantization(model, AutoProcessor.from_pretrained(path),
                              Recipe.parse({"method": method, **RECIPE, **extra}), progress=False, keep_codes=True,
                              driver=driver)
    return model, report


@pytest.mark.parametrize("kind,method", [
    ("blip2_opt", "gptq"), ("blip2_t5", "gptq"), ("blip2_itm", "gptq"), ("llava", "gptq"),
    ("llava", "awq"), ("blip2_t5", "awq"), ("blip2_opt", "rtn"),
])
def test_sequential_driver_gives_the_model_drivers_codes_and_errors_bit_for_bit(tiny_checkpoints, kind, method):
    # ViT, Q-Former (cross-attention to the ViT output), OPT, T5 encoder and decoder (position bias,
    # encoder states), the ITM Q-Former with text, CLIP + Llama: every stack is replayed, none falls back.
    reference, by_model = _quantize(tiny_checkpoints[kind], kind, method, "model")
    quantized, sequential = _quantize(tiny_checkpoints[kind], kind, method, "sequential")
    assert "model_driver_stacks" not in sequential.timing and sequential.timing["block_forwards"] > 0
    a, b = reference.state_dict(), quantized.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(by_model.codes) == set(sequential.codes)
    for name, q in by_model.codes.items():
        assert torch.equal(q.codes, sequential.codes[name].codes), name
    assert [t.output_error for t in by_model.tensors] == [t.output_error for t in sequential.tensors]
    assert [t.output_error_calib for t in by_model.tensors] == [t.output_error_calib for t in sequential.tensors]
    assert by_model.folds == sequential.folds


@pytest.fixture(scope="module")
def blip2_five_layers(tmp_path_factory):
    return build_tiny_blip2_opt(tmp_path_factory.mktemp("blip2_5l") / "model", seed=0, num_layers=5)


def _block_calls(path, driver):
    model = FIXTURE_MODEL_CLASSES["blip2_opt"].from_pretrained(path).eval()
    layers = model.language_model.model.decoder.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, output, i=i: calls.__setitem__(i, calls[i] + 1))
    report = run_quantization(model, AutoProcessor.from_pretrained(path),
                              Recipe.parse({"method": "gptq", "component": "llm", **RECIPE}), progress=False,
                              driver=driver)
    return calls, report


def test_sequential_driver_runs_each_block_at_most_three_times_per_batch(blip2_five_layers):
    batches = 2 + 1  # 8 calibration samples and 4 held out, in batches of 4
    sequential, report = _block_calls(blip2_five_layers, "sequential")
    by_model, _ = _block_calls(blip2_five_layers, "model")
    # Once in the capture pass (the last needed block is not run there), once for its statistics,
    # once quantized to make the next block's inputs (not for the last block): 3n - 2 per batch.
    assert sequential == [3 * batches] * 4 + [batches]
    assert sum(sequential) == (3 * 5 - 2) * batches == report.timing["block_forwards"] + 4 * batches
    # The model driver re-runs the stack up to each block: n (n + 1) / 2 per batch.
    assert by_model == [(5 - i) * batches for i in range(5)] and sum(by_model) == 15 * batches


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "gemma3", "qwen3_vl"])
def test_sequential_driver_on_other_families_and_a_stack_that_is_not_a_plain_chain(tiny_checkpoints, kind):
    # Qwen2.5-VL's vision blocks alternate window and full attention (per-block keyword arguments);
    # Qwen3-VL adds DeepStack visual features between its first LM blocks, so block 1's input is not
    # block 0's output: that stack goes through the model driver, the others are replayed.
    from lmms_quant.fixtures.families import FAMILY_MODEL_CLASSES
    from lmms_quant.processors import load_processor

    runs = {}
    for driver in ("model", "sequential"):
        model = FAMILY_MODEL_CLASSES[kind].from_pretrained(tiny_checkpoints[kind]).eval()
        report = run_quantization(model, load_processor(tiny_checkpoints[kind]),
                                  Recipe.parse({"method": "gptq", **RECIPE}), progress=False, driver=driver)
        runs[driver] = (model.state_dict(), report)
    (a, by_model), (b, sequential) = runs["model"], runs["sequential"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [t.output_error for t in by_model.tensors] == [t.output_error for t in sequential.tensors]
    fallback = sequential.timing.get("model_driver_stacks", {})
    assert set(fallback) == ({"model.language_model.layers"} if kind == "qwen3_vl" else set())
    assert sequential.timing["block_forwards"] > 0


def test_stored_outputs_before_the_last_stack_are_dropped_once_it_is_captured_and_codes_are_unchanged(
        tiny_checkpoints, monkeypatch):
    """LLaVA, everything quantized: the vision tower's stored outputs serve the projector's and the LM's
    capture passes, then nothing; they are let go when the LM stack is captured (not held to the end)."""
    from lmms_quant.quant.calibration import _OutputCache

    cleared = []
    clear = _OutputCache.clear

    def recording(self):
        cleared.append(self.used)
        clear(self)

    monkeypatch.setattr(_OutputCache, "clear", recording)
    quantized, report = _quantize(tiny_checkpoints["llava"], "llava", "gptq", "sequential", component="all")
    assert len(cleared) == 1 and cleared[0] > 0  # once, with something held
    monkeypatch.setattr(_OutputCache, "clear", lambda self: None)
    kept, kept_report = _quantize(tiny_checkpoints["llava"], "llava", "gptq", "sequential", component="all")
    a, b = quantized.state_dict(), kept.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [t.output_error for t in report.tensors] == [t.output_error for t in kept_report.tensors]


def test_real_token_rows_by_the_cached_index_are_the_boolean_masks_rows():
    # Calibration and AWQ's search pick real tokens by an index found once per batch (no device wait):
    # the rows and their order must be boolean indexing's, for (batch, seq, d) and OPT's flattened input.
    from lmms_quant.quant.calib_data import Batch, TokenMasks

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 7, generator=g) > 0.4
    batch = Batch({"x": torch.zeros(1)}, {"attention_mask": mask})
    assert isinstance(batch.masks, TokenMasks)
    x = torch.randn(3, 7, 5, generator=g)
    expected = x[mask]
    assert torch.equal(batch.masks.real_rows(x, "attention_mask"), expected)
    assert torch.equal(batch.masks.real_rows(x.reshape(21, 5), "attention_mask"), expected)
    assert batch.masks.index("attention_mask", "cpu") is batch.masks.index("attention_mask", "cpu")
