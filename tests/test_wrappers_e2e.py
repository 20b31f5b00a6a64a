"""``quant_hf`` and ``quant`` end to end: the real `lmms-eval` command on the tiny family fixtures,
two VQAv2 docs each, quantized, with the report written beside lmms-eval's results."""

import json
import subprocess

import pytest

from test_plugin_e2e import _bin, _env, _results_file


def run_lmms_eval(model, model_args, include_path, out, *extra):
    cmd = [_bin("lmms-eval"), "--model", model, "--model_args", model_args, "--tasks", "vqav2_val_local",
           "--include_path", str(include_path), "--limit", "2", "--output_path", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=out.parent, timeout=900)
    # lmms-eval exits 0 when the evaluation failed: the results file is the proof
    assert proc.returncode == 0 and "Error during evaluation" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    results_path = _results_file(out)
    results = json.loads(results_path.read_text())
    assert isinstance(results["results"]["vqav2_val_local"]["exact_match,none"], float)
    assert results["n-samples"]["vqav2_val_local"]["effective"] == 2
    reports = list(results_path.parent.glob("quant_report_*.json"))
    assert len(reports) == 1, reports
    return results, json.loads(reports[0].read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "idefics3", "smolvlm", "gemma3"])
def test_quant_hf_quantizes_and_scores_a_chat_template_vlm(kind, tiny_checkpoints, include_path, tmp_path):
    results, report = run_lmms_eval(
        "quant_hf", f"pretrained={tiny_checkpoints[kind]},method=gptq,bits=4,component=vit,calib_n=4",
        include_path, tmp_path / "out")
    assert results["config"]["model"] == "quant_hf"
    assert report["model"]["family"] == kind
    tensors = report["tensors"]
    assert tensors and all(t["component"] == "vit" and t["method"] == "gptq" and t["bits"] == 4 for t in tensors)


@pytest.mark.slow
@pytest.mark.parametrize("kind,own_args,served_as", [
    # lmms-eval's qwen2_5_vl hands its processor 200k-pixel minimum images unless told otherwise
    ("qwen2_5_vl", "device=cpu,device_map=cpu,min_pixels=1024,max_pixels=1024", "chat"),
    ("instructblip", "device=cpu", "simple"),
])
def test_quant_runs_lmms_evals_own_model_class_quantized(kind, own_args, served_as, tiny_checkpoints, include_path,
                                                          tmp_path):
    results, report = run_lmms_eval(
        "quant", f"model={kind},pretrained={tiny_checkpoints[kind]},{own_args},method=awq,bits=4,component=llm,calib_n=4",
        include_path, tmp_path / "out", "--log_samples")
    # lmms-eval served the requests in the wrapped class' own format (instructblip is a simple model)
    assert results["config"]["model_backend"] == f"lmms_quant.model_wrappers.lmms_eval_model.QuantLmmsEval ({served_as})"
    assert report["model"]["family"] == kind and report["plan"]["method"] == "awq"
    tensors = report["tensors"]
    assert tensors and all(t["component"] == "llm" and t["bits"] == 4 for t in tensors)
