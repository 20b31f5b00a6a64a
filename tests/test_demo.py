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
