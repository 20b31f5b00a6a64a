"""`lmms-quant demo`: the shipped models through lmms-eval at FP16 and a quantization grid."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_quant.demo import METHODS, _configurations


def test_the_grid_has_every_method_and_width_on_the_whole_model_and_rtn_per_component():
    configs = _configurations(("vit", "connector", "llm"), (4, 3), full=False)
    whole = [c for c in configs if c["component"] == "all"]
    assert len(whole) == len(METHODS) * 2
    assert {(c["method"], c["bits"]) for c in whole} == {(p["method"], b) for p in METHODS.values() for b in (4, 3)}
    parts = [c for c in configs if c["component"] != "all"]
    assert [(c["component"], c["bits"], c.get("granularity")) for c in parts] == [
        ("vit", 3, "uniform"), ("connector", 3, "uniform"), ("llm", 3, "uniform")]
    assert len(_configurations(("vit", "connector", "llm"), (4, 3), full=True)) == len(METHODS) * 2 * 4


@pytest.mark.slow
def test_demo_scores_the_shipped_models_and_shows_what_quantization_does(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(Path(sys.executable).with_name("lmms-quant")), "demo", "--out", str(tmp_path / "demo"),
                           "--bits", "2", "--n-images", "12", "--calib-n", "16"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    rows = {(r["model"], r["configuration"]): r for r in csv.DictReader(open(tmp_path / "demo" / "leaderboard.csv"))}
    # BLIP-2: baseline + 3 methods at 2 bits + per-tensor RTN on vit/connector/llm; ITM: baseline + 3 + vit/connector
    assert len(rows) == 7 + 6, sorted(rows)
    vqa = "vqav2_val_local exact_match"
    baseline = float(rows[("tiny_blip2", "fp16 baseline")][vqa])
    rtn2 = float(rows[("tiny_blip2", "method=rtn granularity=uniform bits=2 component=all")][vqa])
    assert baseline >= 0.85  # the shipped model answers held-out questions through lmms-eval's own metric
    assert rtn2 < baseline - 0.2  # 2-bit per-tensor round-to-nearest on every component breaks it
    assert "not the paper's numbers" in proc.stdout
    # the terminal shows the leaderboard's compact table: one headline metric per task, Δ with its interval
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| model | configuration |"))
    for task, metric in (("coco2017_cap_val_local", "coco_CIDEr"), ("vqav2_val_local", "exact_match"),
                         ("flickr30k_retrieval_local", "r1_mean")):
        assert f"| {task} {metric} | Δ {task} {metric} [95% CI] |" in header


def test_the_demo_pins_one_thread_everywhere_and_avx2_kernels_only_where_the_cpu_has_avx2():
    from lmms_quant.demo import arithmetic_pins

    avx512_amx = arithmetic_pins({"sse2", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
    assert avx512_amx == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
                          "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert arithmetic_pins({"avx2", "fma"}) == avx512_amx  # an AVX2-only CPU runs the same kernels
    assert arithmetic_pins({"sse2", "avx"}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert arithmetic_pins(set()) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # not x86, or unknown


# One demo configuration in a fresh interpreter, the way `lmms-quant demo` runs it: arithmetic pinned
# before torch is imported, the configuration forked from a process that imported lmms-eval.
_ONE_DEMO_CONFIGURATION = """
import sys
from pathlib import Path
from lmms_quant import demo
print(demo.pin_arithmetic())
out = Path(sys.argv[1])
data_root = demo.write_data(out / "data", n_images=6)
spec = demo.demo_grids(out, data_root, (2,), calib_n=8, full=False)[0]
spec["include"] = [{**demo.METHODS["gptq"], "bits": 2, "component": "all"}]
outcome = demo.run_grid(spec, select=lambda config: not config.is_baseline)
sys.exit(0 if list(outcome.values()) == ["ok"] else 1)
"""


def _scored(out: Path) -> dict:
    """Scores, per-document answers, quantization report and weight digests of a one-configuration run."""
    import json

    (run_json,) = (out / "runs" / "blip2" / "runs").glob("*/run.json")
    record = json.loads(run_json.read_text())
    run_dir = run_json.parent
    results = json.loads((run_dir / record["results_file"]).read_text())["results"]
    answers = {}
    for samples in sorted(run_dir.glob("lmms_eval/*/*_samples_*.jsonl")):
        task = samples.name.split("_samples_", 1)[1]
        answers[task] = [(r["doc_id"], r["filtered_resps"]) for r in map(json.loads, samples.read_text().splitlines())]
    (report,) = run_dir.glob("lmms_eval/*/quant_report_*.json")
    report = json.loads(report.read_text())
    (manifest,) = (out / "runs" / "blip2" / "weight_cache").glob("*/manifest.json")
    weights = json.loads(manifest.read_text())["files"]["weights.safetensors"]
    return {"results": results, "answers": answers, "tensors": report["tensors"], "weights": weights,
            "environment": report["environment"], "model": report["model"]}


@pytest.mark.slow
def test_the_demos_2bit_gptq_configuration_scores_the_same_twice(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    runs = []
    for name in ("first", "second"):  # two processes: quantized and evaluated from scratch each time
        proc = subprocess.run([sys.executable, "-c", _ONE_DEMO_CONFIGURATION, str(tmp_path / name)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "arithmetic: float32, 1 thread" in proc.stdout
        runs.append(_scored(tmp_path / name))
    first, second = runs
    # The report says what the numbers were computed with.
    environment = first["environment"]
    assert first["model"]["dtype"] == "torch.float32" and environment["torch_threads"] == 1
    assert {"torch", "transformers", "lmms_eval", "mkl", "onednn", "cpu", "cpu_capability"} <= set(environment)
    if {"avx2", "fma"} <= set(environment["cpu_flags"]):
        assert environment["cpu_capability"] == "AVX2"
        assert environment["arithmetic_env"]["MKL_CBWR"] == "AVX2"
    assert first["results"]["vqav2_val_local"]["exact_match,none"] > 0.5
    assert first["results"]["coco2017_cap_val_local"]["coco_CIDEr,none"] > 1
    assert first["weights"] == second["weights"]  # bit-identical quantized weights (sha256 per file)
    assert first["tensors"] == second["tensors"]  # and the same per-tensor errors
    assert first["answers"] == second["answers"]
    assert first["results"] == second["results"]  # every score, exactly
