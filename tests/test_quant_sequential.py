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
    calls = [0] * len(layers)  # calls begun (a statistics pass may stop inside the block)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    report = run_quantization(model, AutoProcessor.from_pretrained(path),
                              Recipe.parse({"method": "gptq", "component": "llm", **RECIPE}), progress=False,
                              driver=driver)
    return calls, report


def test_sequential_driver_runs_each_block_at_most_three_times_per_batch_and_captures_repeated_calls_once(blip2_five_layers):
    batches = 2 + 1  # 8 calibration samples and 4 held out, in batches of 4
    sequential, report = _block_calls(blip2_five_layers, "sequential")
    by_model, _ = _block_calls(blip2_five_layers, "model")
    # The capture: the first forward begins every block up to the last needed one; OPT passes every
    # block the same mask, so later forwards stop at block 1's input (blocks 0 and 1 are always
    # recorded, `sequential._templates`). Then once for its statistics, and once quantized to make
    # the next block's inputs (not the last block).
    capture = [batches, batches, 1, 1, 1]
    assert sequential == [c + 2 * batches for c in capture[:4]] + [capture[4] + batches]
    assert sum(sequential) - sum(capture) == report.timing["block_forwards"] == (2 * 5 - 1) * batches
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
    from lmms_quant.quant.output_cache import OutputCache

    cleared = []
    clear = OutputCache.clear

    def recording(self):
        cleared.append(self.used)
        clear(self)

    monkeypatch.setattr(OutputCache, "clear", recording)
    quantized, report = _quantize(tiny_checkpoints["llava"], "llava", "gptq", "sequential", component="all")
    assert len(cleared) == 1 and cleared[0] > 0  # once, with something held
    monkeypatch.setattr(OutputCache, "clear", lambda self: None)
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


class _TwoLinearBlock(torch.nn.Module):
    """a, then b; with ``a_again``, a once more on b's output (a Linear called twice in one forward)."""

    def __init__(self, d=16, a_again=False):
        super().__init__()
        self.a, self.b, self.a_again = torch.nn.Linear(d, d), torch.nn.Linear(d, d), a_again

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.a(y) if self.a_again else y


def _collect_two_linear_block(block):
    from lmms_quant.quant.archs import LinearSite, Target, Unit, UnitSite
    from lmms_quant.quant.calibration import Batch, Calibrator
    from lmms_quant.quant.quantizer import QuantGrid

    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=8)
    sites = [LinearSite(n, block.get_submodule(n), n, "llm", None, None, None) for n in ("a", "b")]
    unit = Unit(UnitSite("block", "llm", None, None, None, sites, []), [Target(s, grid) for s in sites], [], block)
    torch.manual_seed(0)
    batches = [Batch({"x": torch.randn(3, 5, 16)}) for _ in range(4)]
    completed = {"b": 0}
    block.b.register_forward_hook(lambda *_: completed.__setitem__("b", completed["b"] + 1))
    with torch.no_grad():
        stats = Calibrator(block, batches, [], seed=0, device="cpu", dtype=torch.float32).collect(unit, hessian=True)
        b_ran = completed["b"]
        inputs = {"a": [], "b": []}
        for batch in batches:
            x = batch.inputs["x"].reshape(-1, 16)
            h = torch.relu(block.a(x))
            inputs["a"].append(x)
            inputs["b"].append(h)
            if block.a_again:
                inputs["a"].append(block.b(h))
    expected = {n: sum(x.T @ x for x in xs) for n, xs in inputs.items()}
    return stats, expected, b_ran


def test_calibration_passes_after_the_first_stop_at_the_units_last_linear_input_with_the_same_statistics():
    # The unit's last Linear (b) and what follows it run on the first pass only; the Hessians hold
    # every batch's rows all the same.
    stats, expected, b_ran = _collect_two_linear_block(_TwoLinearBlock())
    assert b_ran == 1
    for name in ("a", "b"):
        torch.testing.assert_close(stats[name].hessian, expected[name], rtol=1e-5, atol=1e-4)
        assert stats[name].n_calib == 4 * 15


def test_a_linear_called_again_after_the_last_ones_input_keeps_every_call():
    # Stopping at b's input would lose a's second call: the first pass shows it, so no pass stops early.
    stats, expected, b_ran = _collect_two_linear_block(_TwoLinearBlock(a_again=True))
    assert b_ran == 4
    torch.testing.assert_close(stats["a"].hessian, expected["a"], rtol=1e-5, atol=1e-4)
    assert stats["a"].n_calib == 4 * 15 * 2


def test_capture_templates_repeat_only_calls_with_the_very_same_tensors():
    # Later forwards of the capture stop at the last block whose call is its own; a block repeats an
    # earlier one only for the same tensor objects (an equal copy is not the same argument).
    from lmms_quant.quant.sequential import _BlockCall, _templates

    mask, sliding, bias = torch.ones(2, 3), torch.zeros(2, 3), torch.randn(2, 3)

    def call(**kwargs):
        return _BlockCall((), kwargs, {}, False)

    # T5: block 0 gets no position bias and makes it; every later block gets block 0's
    t5 = {0: call(mask=mask, bias=None)} | {j: call(mask=mask, bias=bias) for j in range(1, 6)}
    assert _templates(t5, 0, 5) == {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    # Gemma 3: sliding-window layers and full layers, two masks
    gemma = {j: call(mask=mask if j % 3 == 2 else sliding, pos=(bias, mask)) for j in range(6)}
    assert _templates(gemma, 0, 5) == {0: 0, 1: 1, 2: 2, 3: 0, 4: 0, 5: 2}
    # equal but not the same tensor: its own call; a different plain value too
    copies = {0: call(mask=mask), 1: call(mask=mask), 2: call(mask=mask.clone()), 3: call(mask=mask, idx=3)}
    assert _templates(copies, 0, 3) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert _templates({4: call(mask=mask), 5: call(mask=mask)}, 4, 5) == {4: 4, 5: 5}
