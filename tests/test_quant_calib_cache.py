"""Reusing the outputs of finished components during calibration changes no statistic, hence no code."""

import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from lmms_quant.fixtures.models import build_tiny_blip2_opt
from lmms_quant.quant import Recipe, calibration, quantize
from lmms_quant.quant.output_cache import OutputCache


def _gptq_codes(path, monkeypatch, cache_mb):
    monkeypatch.setenv("LMMS_QUANT_CALIB_CACHE_MB", str(cache_mb))
    hits = []
    original = calibration.Calibrator.collect

    def collect(self, unit, **kwargs):
        stats = original(self, unit, **kwargs)
        hits.append(self.cache.hits)
        return stats

    monkeypatch.setattr(calibration.Calibrator, "collect", collect)
    model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    plan = Recipe.parse({"method": "gptq", "bits": 3, "group_size": 32, "calib_n": 8, "calib_batch_size": 4})
    report = quantize(model, Blip2Processor.from_pretrained(path), plan, keep_codes=True, progress=False)
    return report, hits[-1]


def test_reused_component_outputs_give_the_same_codes(tmp_path, monkeypatch):
    path = build_tiny_blip2_opt(tmp_path / "blip2")
    cached, hits = _gptq_codes(path, monkeypatch, 1024)
    plain, no_hits = _gptq_codes(path, monkeypatch, 0)
    assert no_hits == 0
    # LLM units reuse the vision tower and Q-Former outputs of every calibration and held-out batch.
    assert hits > 0
    assert set(cached.codes) == set(plain.codes)
    for name in plain.codes:
        assert torch.equal(cached.codes[name].codes, plain.codes[name].codes), name
    assert [t.output_error for t in cached.tensors] == [t.output_error for t in plain.tensors]


def test_a_reused_output_is_a_fresh_container_a_caller_may_rewrite():
    # Qwen2.5-VL's get_image_features replaces pooler_output of the vision tower's output with its
    # split; a reused output must still be what the tower returns, not the caller's rewrite.
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, x):
            return BaseModelOutputWithPooling(last_hidden_state=self.proj(x), pooler_output=self.proj(x).sum(0))

    tower, x = Tower(), torch.ones(4, 2)
    cache = OutputCache(budget_bytes=2**20)
    cached = cache._cached_forward(tower, tower.forward, {"phase": "calib", "batch_id": 0})
    first = cached(x)
    pooled = first.pooler_output
    first.pooler_output = torch.split(first.pooler_output, [1, 1])  # what the caller does with it
    again = cached(x)
    assert cache.hits == 1 and isinstance(again.pooler_output, torch.Tensor) and torch.equal(again.pooler_output, pooled)
