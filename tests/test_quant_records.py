"""A unit's statistics are read one unit later (`records`, `span_clock.HostRead`): the same values, and a
method's failure still fails the run, naming its unit."""

import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant import Recipe, gptq, quantize
from lmms_quant.quant.quantizer import QuantGrid
from lmms_quant.quant.span_clock import HostRead, Later


def test_host_read_gives_each_tensor_its_values_in_order():
    tensors = [torch.tensor([1.5, -2.0]), torch.tensor(True), torch.arange(6, dtype=torch.int32).reshape(2, 3),
               torch.tensor([], dtype=torch.float64)]
    assert HostRead(tensors).values() == [[1.5, -2.0], [1.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], []]
    assert HostRead([]).values() == []


def test_later_works_its_value_out_once_when_first_asked():
    calls = []
    later = Later(lambda: calls.append(1) or 42)
    assert calls == []
    assert later.get() == 42 and later.get() == 42 and calls == [1]


def test_an_unchecked_run_returns_its_failure_as_flags_and_a_checked_one_raises_it():
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    good = torch.eye(64)
    bad = torch.eye(64)
    bad[7, 7] = -50.0  # λ = 0.01 mean(diag) cannot lift it
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    jobs = [dict(weight=w.clone(), hessian=h, grid=grid) for h in (good, bad, torch.zeros(64, 64))]
    done = gptq.quantize_rows_concurrently(iter(jobs), device="cpu", check=False)
    flags = [d.flags.tolist() for d in done]
    assert flags == [[True, True], [True, False], [False, True]]
    assert gptq.failure(flags[0], 0.01) is None
    assert isinstance(gptq.failure(flags[1], 0.01), gptq.HessianNotPositiveDefinite)
    assert isinstance(gptq.failure(flags[2], 0.01), gptq.NoCalibrationData)
    with pytest.raises(gptq.HessianNotPositiveDefinite):
        gptq.quantize_rows_concurrently(iter([dict(weight=w.clone(), hessian=bad.clone(), grid=grid)]), device="cpu")


def test_a_hessian_that_does_not_factor_fails_the_run_naming_its_unit(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["blip2_opt"]
    model = FIXTURE_MODEL_CLASSES["blip2_opt"].from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    real = torch.linalg.cholesky_ex
    calls = {"n": 0}

    def second_block_fails(H, *args, **kwargs):  # the runs of the ViT's block 1 say "not positive definite"
        L, info = real(H, *args, **kwargs)
        calls["n"] += 1
        return L, (info + 1 if unit_name["now"].endswith("layers.1") else info)

    unit_name = {"now": ""}
    real_quantize_unit = gptq.quantize_unit

    def tracking(unit, stats, cfg):
        unit_name["now"] = unit.name
        return real_quantize_unit(unit, stats, cfg)

    monkeypatch.setattr(gptq.torch.linalg, "cholesky_ex", second_block_fails)
    monkeypatch.setattr(gptq, "quantize_unit", tracking)
    recipe = Recipe.parse({"method": "gptq", "bits": 4, "group_size": 32, "component": "vit", "calib_n": 4,
                           "calib_batch_size": 4})
    with pytest.raises(gptq.HessianNotPositiveDefinite, match=r"vision_model\.encoder\.layers\.1: .*damp=0\.01"):
        quantize(model, processor, recipe, progress=False)
    assert calls["n"] > 0
