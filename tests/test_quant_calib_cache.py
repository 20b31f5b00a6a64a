"""Reusing the outputs of finished components during calibration changes no statistic, hence no code."""

import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from lmms_quant.fixtures.models import build_tiny_blip2_opt
from lmms_quant.quant import QuantPlan, calibration, quantize_model


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
    plan = QuantPlan.from_kwargs({"method": "gptq", "bits": 3, "group_size": 32, "calib_n": 8, "calib_batch_size": 4})
    report = quantize_model(model, Blip2Processor.from_pretrained(path), plan, keep_codes=True, progress=False)
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

    pooled = torch.ones(4, 2)
    stored = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(4, 2), pooler_output=pooled)
    given = calibration._fresh(stored)
    given.pooler_output = torch.split(given.pooler_output, [2, 2])
    assert type(given) is type(stored) and stored.pooler_output is pooled
    again = calibration._fresh(stored)
    assert again.pooler_output is pooled and again.last_hidden_state is stored.last_hidden_state
    assert calibration._fresh((pooled, [pooled])) == (pooled, [pooled])
