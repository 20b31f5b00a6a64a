"""`lmms-quant leaderboard`: one row per finished configuration with bits, bpw, size, metrics and Δ vs
the FP16 baseline with a paired bootstrap interval for every metric (per-document means, caption corpus
metrics recomputed per resample, retrieval recall); a compact Markdown table (one headline metric per
task), a complete CSV and a self-contained HTML page that works in a real (headless) browser.

The runs come from a sweep evaluated by tests/fake_eval_output.py (a stand-in for the `lmms-quant
eval` subprocess that writes lmms-eval's output layout and a quantization report).
"""

import csv
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmms_quant import leaderboard
from lmms_quant.leaderboard import (Delta, bootstrap_ci, build_table, collect_runs, pareto_frontier,
                                    read_samples, write_leaderboard)
from lmms_quant.leaderboard.bootstrap import paired_interval
from lmms_quant.leaderboard.captions import BleuStatistic, CiderStatistic, rouge_statistic
from lmms_quant.leaderboard.collect import read_sample_log
from lmms_quant.leaderboard.stats import RecallStatistic
from lmms_quant.sweep import SweepRunner, load_grid

FAKE_EVAL = [sys.executable, str(Path(__file__).with_name("fake_eval_output.py"))]
TASKS = ["vqav2_val_local", "coco2017_cap_val_local"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime: caption metrics need "
                                                                      "pycocoevalcap's PTB tokenizer (bootstrap.sh installs it)")


def sweep_into(out: Path, tmp_path: Path, **grid_overrides) -> list:
    grid = {"model": "quant_blip2", "model_args": {"pretrained": "/checkpoints/tiny-blip2", "dtype": "float32"},
            "tasks": TASKS, "axes": {"method": ["rtn", "gptq"], "component": ["vit", "llm"], "bits": [4, 8]},
            "output_dir": str(out)}
    grid.update(grid_overrides)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    loaded = load_grid(path)
    outcome = SweepRunner(loaded.output_dir, eval_command=FAKE_EVAL, stream=io.StringIO()).run(loaded.configurations)
    assert set(outcome.values()) == {"ok"}
    return list(loaded.configurations)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    out = tmp / "sweep"
    configs = sweep_into(out, tmp)
    assert len(configs) == 9  # 2 methods x 2 components x 2 bit widths + the fp16 baseline
    return out


@pytest.fixture(scope="module")
def table(runs_dir):
    return build_table(collect_runs(runs_dir))


def _row(table, label):
    return next(r for r in table.rows if r["label"] == label)


def _shown(table, label):
    return table.display[table.rows.index(_row(table, label))]


# --------------------------------------------------------------------------- rows and Δ


def test_one_row_per_configuration_with_bits_bpw_size_and_kind(table):
    assert len(table.rows) == 9 and len({r["id"] for r in table.rows}) == 9
    keys = [c.key for c in table.columns]
    assert {"bits:vit", "bits:llm", "bits:connector", "bpw", "size", "kind", "method"} <= set(keys)
    baseline = _row(table, "fp16 baseline")
    # no report: the FP16 baseline is the 16 bits every report's bits per weight are measured against
    # (whatever the checkpoint's dtype, here float32)
    assert baseline["kind"] == "baseline" and baseline["bpw"] == 16.0
    row = _row(table, "method=rtn component=vit bits=4")
    assert row["bits:vit"] == 4 and row["bits:llm"] == 16 and row["kind"] == "simulated"
    assert row["method"] == "rtn"
    # bpw and size are the report's (the fake's report: 4 bits + 32/128 of scale/zero overhead on ViT)
    expected_bpw = ((4 + 0.25) * 4000 + 16 * 1000 + 16 * 5000 + 16 * 500) / 10500
    assert row["bpw"] == pytest.approx(expected_bpw)
    assert row["size"] == int(expected_bpw * 10500 / 8)
    assert row["quantized_params"] == 4000


def test_delta_vs_fp16_is_the_score_difference_with_a_paired_bootstrap_ci(table, runs_dir):
    base = _row(table, "fp16 baseline")
    key = "vqav2_val_local:exact_match"
    assert _shown(table, "fp16 baseline")[f"d:{key}"] == "baseline"
    for row in table.rows:
        if row["kind"] == "baseline":
            continue
        delta, low, high = row[f"d:{key}"], row[f"d:{key}:ci_low"], row[f"d:{key}:ci_high"]
        assert delta == pytest.approx(row[f"m:{key}"] - base[f"m:{key}"])
        assert low <= delta <= high and high - low > 0
    # the CI is the bootstrap of the per-document differences read from the two samples files
    row = _row(table, "method=rtn component=llm bits=4")
    samples = {r: next((runs_dir / "runs" / r).glob("lmms_eval/*/*_samples_vqav2_val_local.jsonl"))
               for r in (row["id"], base["id"])}
    mine, _ = read_samples(samples[row["id"]], "exact_match")
    theirs, _ = read_samples(samples[base["id"]], "exact_match")
    differences = np.array([mine[d] - theirs[d] for d in sorted(mine)])
    assert (row[f"d:{key}:ci_low"], row[f"d:{key}:ci_high"]) == bootstrap_ci(differences)
    assert _shown(table, "method=rtn component=llm bits=4")[f"d:{key}"] == Delta(
        row[f"d:{key}"], *bootstrap_ci(differences)).text()


def _samples(runs_dir, run_id, task):
    return next((runs_dir / "runs" / run_id).glob(f"lmms_eval/*/*_samples_{task}.jsonl"))


@needs_java
def test_caption_metrics_get_a_paired_interval_recomputed_on_every_resample(table, runs_dir):
    base = _row(table, "fp16 baseline")
    row = _row(table, "method=gptq component=vit bits=8")

    def captions(run_id):  # the fake logs captions already in PTB-tokenized form
        entries = read_sample_log(_samples(runs_dir, run_id, "coco2017_cap_val_local")).values_of("coco_CIDEr")
        return [e["pred"] for e in entries], [e["answer"] for e in entries]

    for metric, statistic in (("coco_CIDEr", CiderStatistic), ("coco_Bleu_4", lambda p, r: BleuStatistic(p, r, 4)),
                              ("coco_ROUGE_L", rouge_statistic)):
        key = f"coco2017_cap_val_local:{metric}"
        assert row[f"d:{key}"] == pytest.approx(row[f"m:{key}"] - base[f"m:{key}"])
        expected = paired_interval(statistic(*captions(row["id"])), statistic(*captions(base["id"])))
        assert (row[f"d:{key}:ci_low"], row[f"d:{key}:ci_high"]) == pytest.approx(expected, abs=1e-12)
        assert row[f"d:{key}:ci_low"] < row[f"d:{key}:ci_high"]
    assert not any("no interval" in n for n in table.notes)


def test_a_recomputed_metric_that_does_not_reproduce_the_reported_score_gets_no_interval(tmp_path):
    import json

    out = tmp_path / "tampered"
    sweep_into(out, tmp_path, axes={"method": ["rtn"], "bits": [4]}, tasks=["vqav2_val_local"])
    results = next(p for p in (out / "runs").glob("*/lmms_eval/*/*_results.json") if "method=rtn" in p.read_text())
    data = json.loads(results.read_text())
    data["results"]["vqav2_val_local"]["exact_match,none"] += 0.01  # no longer the mean of the logged scores
    results.write_text(json.dumps(data))
    row = _row(build_table(collect_runs(out)), "method=rtn bits=4")
    assert row["d:vqav2_val_local:exact_match"] is not None and row["d:vqav2_val_local:exact_match:ci_low"] is None


def test_without_java_caption_metrics_have_no_interval_and_the_notes_say_why(runs_dir, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else "/usr/bin/" + name)
    table = build_table(collect_runs(runs_dir))
    row = _row(table, "method=gptq component=vit bits=8")
    assert row["d:coco2017_cap_val_local:coco_CIDEr:ci_low"] is None
    assert row["d:vqav2_val_local:exact_match:ci_low"] is not None
    assert any("coco_CIDEr" in n and "Java runtime not found" in n for n in table.notes)


def test_bootstrap_ci_matches_the_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(1)
    differences = rng.normal(0.1, 1.0, size=400)
    low, high = bootstrap_ci(differences)
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert low < differences.mean() < high
    assert bootstrap_ci(differences) == (low, high)
    assert bootstrap_ci(np.full(50, 0.25)) == pytest.approx((0.25, 0.25))


def test_baseline_must_be_the_same_model_on_the_same_documents(tmp_path):
    out = tmp_path / "mixed"
    sweep_into(out, tmp_path, axes={"method": ["rtn"], "bits": [4]}, tasks=["vqav2_val_local"])
    # a --limit run: the full-split baseline scored other documents, its own limited baseline did not
    sweep_into(out, tmp_path, axes={"method": ["rtn"], "bits": [8]}, tasks=["vqav2_val_local"], limit=10)
    table = build_table(collect_runs(out))
    assert len(table.rows) == 4  # two baselines (full, limited) and two quantized rows
    limited = _row(table, "method=rtn bits=8")
    assert limited["docs"] == "vqav2_val_local: 10/40"
    assert limited["d:vqav2_val_local:exact_match"] is not None  # compared with the limited baseline
    assert any("--limit" in n for n in table.notes)


def test_without_a_baseline_there_is_no_delta_and_the_note_says_so(tmp_path):
    out = tmp_path / "nobase"
    configs = sweep_into(out, tmp_path, axes={"method": ["rtn"], "bits": [4]}, tasks=["vqav2_val_local"])
    shutil.rmtree(out / "runs" / configs[0].run_id)  # the fp16 baseline
    table = build_table(collect_runs(out))
    assert [r["label"] for r in table.rows] == ["method=rtn bits=4"]
    assert table.rows[0]["d:vqav2_val_local:exact_match"] is None
    assert table.display[0]["d:vqav2_val_local:exact_match"] == "n/a"
    assert any("no FP16 baseline" in n for n in table.notes)


def test_unfinished_and_failed_configurations_are_not_rows(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_EVAL_FAIL_ON", "llm_bits=8")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"model": "quant_blip2", "model_args": {"pretrained": "/c"},
                                    "tasks": ["vqav2_val_local"], "axes": {"method": ["rtn"], "bits": [4, 8]},
                                    "output_dir": str(out)}, sort_keys=False))
    loaded = load_grid(grid)
    SweepRunner(out, eval_command=FAKE_EVAL, stream=io.StringIO()).run(loaded.configurations)
    interrupted = out / "runs" / "0123456789abcdef"  # results written, but the sweep died before run.json
    (interrupted / "lmms_eval" / "c").mkdir(parents=True)
    (interrupted / "config.json").write_text("{}")
    shutil.copy(next((out / "runs").glob("*/lmms_eval/*/*_results.json")),
                interrupted / "lmms_eval" / "c" / "20260101_000000_results.json")
    collection = collect_runs(out)
    assert [r.label for r in collection.runs] == ["fp16 baseline", "method=rtn bits=4"]
    assert [d["label"] for d in collection.failed] == ["method=rtn bits=8"]
    assert collection.incomplete == ["runs/0123456789abcdef"]
    notes = build_table(collection).notes
    assert any("method=rtn bits=8" in n and "exited with status 1" in n for n in notes)


def test_plain_lmms_quant_eval_output_directories_are_read_too(tmp_path):
    for name, plan in (("fp16", "method=fp16"), ("rtn4", "method=rtn,bits=4")):
        subprocess.run([*FAKE_EVAL, "--model", "quant_blip2", "--model_args", f"pretrained=/m/tiny,{plan}",
                        "--tasks", "vqav2_val_local", "--output_path", str(tmp_path / name), "--log_samples"],
                       check=True)
    table = build_table(collect_runs(tmp_path))
    assert sorted(r["method"] for r in table.rows) == ["fp16", "rtn"]
    rtn = next(r for r in table.rows if r["method"] == "rtn")
    assert rtn["d:vqav2_val_local:exact_match:ci_low"] is not None


# --------------------------------------------------------------------------- files


def test_markdown_and_csv_are_complete_and_reproducible(runs_dir, tmp_path):
    first, table = write_leaderboard(runs_dir, tmp_path / "a")
    second, _ = write_leaderboard(runs_dir, tmp_path / "b")
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes()
    assert str(runs_dir) not in first["leaderboard.html"].read_text()  # no absolute paths
    rows = list(csv.DictReader(io.StringIO(first["leaderboard.csv"].read_text())))
    assert len(rows) == 9
    row = next(r for r in rows if r["configuration"] == "method=gptq component=llm bits=4")
    assert float(row["Δ vqav2_val_local exact_match ci_low"]) <= float(row["Δ vqav2_val_local exact_match"])
    assert row["bits llm"] == "4" and row["kind"] == "simulated"
    md = first["leaderboard.md"].read_text().splitlines()
    table_lines = [line for line in md if line.startswith("| ")]
    assert len(table_lines) == 1 + 9  # header + one line per configuration
    assert "Δ vqav2_val_local exact_match" in table_lines[0]


def test_cli_writes_the_three_files_and_fails_on_an_empty_directory(runs_dir, tmp_path, capsys):
    assert leaderboard.main([str(runs_dir), "--out", str(tmp_path / "lb")]) == 0
    assert sorted(p.name for p in (tmp_path / "lb").iterdir()) == ["leaderboard.csv", "leaderboard.html",
                                                                   "leaderboard.md"]
    (tmp_path / "empty").mkdir()
    assert leaderboard.main([str(tmp_path / "empty")]) == 1
    assert leaderboard.main([str(tmp_path / "missing")]) == 2


def _markdown_table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")]


def test_markdown_is_compact_one_headline_metric_per_task_and_the_csv_keeps_every_metric(runs_dir, tmp_path):
    files, table = write_leaderboard(runs_dir, tmp_path)
    header, *rows = _markdown_table(files["leaderboard.md"].read_text())
    assert header == ["model", "configuration", "bpw (incl. overhead)",
                      "coco2017_cap_val_local coco_CIDEr", "Δ coco2017_cap_val_local coco_CIDEr [95% CI]",
                      "vqav2_val_local exact_match", "Δ vqav2_val_local exact_match [95% CI]"]
    cells = dict(zip(header, next(r for r in rows if r[1] == "method=rtn component=llm bits=4")))
    row = _row(table, "method=rtn component=llm bits=4")
    key = "vqav2_val_local:exact_match"
    assert cells["vqav2_val_local exact_match"] == f"{row['m:' + key]:.3f}"
    assert cells["Δ vqav2_val_local exact_match [95% CI]"].startswith(
        f"{row['d:' + key]:+.3f} [{row['d:' + key + ':ci_low']:+.3f}, {row['d:' + key + ':ci_high']:+.3f}]")
    assert next(r for r in rows if r[1] == "fp16 baseline")[4] == "baseline"
    titles = next(csv.reader(io.StringIO(files["leaderboard.csv"].read_text())))
    for metric in ("coco_Bleu_1", "coco_Bleu_4", "coco_ROUGE_L", "coco_CIDEr"):  # every sub-metric, in the CSV only
        assert f"Δ coco2017_cap_val_local {metric} ci_high" in titles
        assert (f"coco2017_cap_val_local {metric}" in header) == (metric == "coco_CIDEr")


def test_a_delta_whose_interval_excludes_zero_is_starred_in_markdown_and_bold_on_the_page(runs_dir, tmp_path):
    files, table = write_leaderboard(runs_dir, tmp_path)
    header, *rows = _markdown_table(files["leaderboard.md"].read_text())
    page = files["leaderboard.html"].read_text()
    seen = set()
    for row, md in zip(table.rows[1:], rows[1:]):
        for task, metric in (("coco2017_cap_val_local", "coco_CIDEr"), ("vqav2_val_local", "exact_match")):
            key = f"d:{task}:{metric}"
            excludes = row[f"{key}:ci_low"] > 0 or row[f"{key}:ci_high"] < 0
            seen.add(excludes)
            assert md[header.index(f"Δ {task} {metric} [95% CI]")].endswith(" *") == excludes
            cell = re.search(rf'<tr data-id="{row["id"]}".*?<td class="([^"]*)" data-value="{re.escape(repr(row[key]))}"',
                             page).group(1)
            assert ("sig" in cell.split()) == excludes
    assert seen == {True, False}  # the fixture has both kinds


def test_headline_is_chosen_per_task_and_a_bad_choice_names_the_valid_ones(runs_dir, tmp_path, capsys):
    assert leaderboard.main([str(runs_dir), "--out", str(tmp_path), "--headline", "coco2017_cap_val_local=Bleu_4"]) == 0
    header = _markdown_table((tmp_path / "leaderboard.md").read_text())[0]
    assert "coco2017_cap_val_local coco_Bleu_4" in header and "coco2017_cap_val_local coco_CIDEr" not in header
    assert leaderboard.main([str(runs_dir), "--out", str(tmp_path), "--headline", "coco2017_cap_val_local=SPICE"]) == 2
    err = capsys.readouterr().err
    assert "coco2017_cap_val_local=SPICE" in err and "coco_CIDEr" in err and "coco_Bleu_4" in err
    assert leaderboard.main([str(runs_dir), "--out", str(tmp_path), "--headline", "gqa=exact_match"]) == 2
    assert "'gqa'" in capsys.readouterr().err
    assert leaderboard.main([str(runs_dir), "--out", str(tmp_path), "--headline", "CIDEr"]) == 2
    assert "TASK=METRIC" in capsys.readouterr().err


def test_rows_are_grouped_by_model_and_sorted_by_bpw_within_a_method(tmp_path):
    root = tmp_path / "two-models"
    for name in ("b-model", "a-model"):
        sweep_into(root / name, tmp_path, model_args={"pretrained": f"/checkpoints/{name}"},
                   axes={"method": ["rtn", "gptq"], "bits": [8, 4, 3]}, tasks=["vqav2_val_local"])
    table = build_table(collect_runs(root))
    order = [(r["model"], r["kind"] == "baseline", r["method"], r["bpw"]) for r in table.rows]
    assert [m for m, *_ in order] == ["a-model"] * 7 + ["b-model"] * 7
    for model in ("a-model", "b-model"):
        mine = [o for o in order if o[0] == model]
        assert mine[0][1] and not any(b for _, b, _, _ in mine[1:])  # the baseline leads its model
        assert [m for _, _, m, _ in mine[1:]] == ["gptq"] * 3 + ["rtn"] * 3
        for method in ("gptq", "rtn"):
            bpw = [b for _, _, m, b in mine if m == method]
            assert bpw == sorted(bpw, reverse=True) and len(set(bpw)) == 3


def test_packed_rows_show_the_measured_file_size_and_the_notes_say_which_rows_are_packed(tmp_path, monkeypatch):
    import json

    out = tmp_path / "packed"
    monkeypatch.setenv("FAKE_EVAL_EXPORT_ON", "method=gptq")
    sweep_into(out, tmp_path, axes={"method": ["rtn", "gptq"], "bits": [4]}, tasks=["vqav2_val_local"])
    files, table = write_leaderboard(out, tmp_path / "lb")
    packed, simulated = _row(table, "method=gptq bits=4"), _row(table, "method=rtn bits=4")
    report = json.loads(next((out / "runs" / packed["id"]).glob("lmms_eval/*/quant_report_*.json")).read_text())
    assert packed["kind"] == "packed" and simulated["kind"] == "simulated"
    assert packed["file_bytes"] == report["export"]["file_bytes"] and simulated["file_bytes"] is None
    assert packed["bpw"] == report["total"]["bits_per_weight"]  # the report's bpw, beside the measured file
    header, *rows = _markdown_table(files["leaderboard.md"].read_text())
    assert header[header.index("bpw (incl. overhead)") + 1] == "packed file (bytes)"
    cells = dict(zip(header, next(r for r in rows if r[1] == "method=gptq bits=4")))
    assert cells["packed file (bytes)"] == leaderboard.table.fmt_size(report["export"]["file_bytes"])
    assert dict(zip(header, next(r for r in rows if r[1] == "method=rtn bits=4")))["packed file (bytes)"] == ""
    notes = " ".join(table.notes)
    assert "Packed (1 rows)" in notes and "method=gptq bits=4 (compressed-tensors, file" in notes
    assert "Simulated (1 of 2 quantized rows)" in notes
    assert str(out) not in files["leaderboard.html"].read_text()  # the export's directory is not shown
    csv_row = next(r for r in csv.DictReader(io.StringIO(files["leaderboard.csv"].read_text()))
                   if r["configuration"] == "method=gptq bits=4")
    assert csv_row["export format"] == "compressed-tensors" and csv_row["export device"] == "cpu"


def test_retrieval_headline_is_mean_r1_with_a_paired_interval_over_the_queries(tmp_path):
    out = tmp_path / "retrieval"
    sweep_into(out, tmp_path, model="quant_blip2_itm", tasks=["flickr30k_retrieval_local"],
               axes={"method": ["rtn"], "bits": [2, 4], "component": ["vit"]})
    table = build_table(collect_runs(out))
    assert [(h.task, h.metric) for h in table.headlines] == [("flickr30k_retrieval_local", "r1_mean")]
    base, row = _row(table, "fp16 baseline"), _row(table, "method=rtn bits=2 component=vit")
    key = "flickr30k_retrieval_local:r1_mean"
    assert base[f"m:{key}"] == pytest.approx((base["m:flickr30k_retrieval_local:i2t_r1"]
                                              + base["m:flickr30k_retrieval_local:t2i_r1"]) / 2)

    def records(run_id):
        return read_sample_log(_samples(out, run_id, "flickr30k_retrieval_local")).values_of("i2t_r1")

    for metric in ("r1_mean", "t2i_r1", "i2t_r10", "r_mean"):
        k = f"flickr30k_retrieval_local:{metric}"
        expected = paired_interval(RecallStatistic(records(row["id"]), metric), RecallStatistic(records(base["id"]), metric))
        assert (row[f"d:{k}:ci_low"], row[f"d:{k}:ci_high"]) == pytest.approx(expected, abs=1e-12)
    assert row[f"d:{key}:ci_low"] < row[f"d:{key}"] < row[f"d:{key}:ci_high"]
    assert any(n.startswith("r1_mean: mean of image→text and text→image R@1") for n in table.notes)


# --------------------------------------------------------------------------- sensitivity heatmap


def test_a_heatmap_cell_comes_only_from_the_component_quantized_alone_and_all_has_its_own_row(tmp_path):
    from lmms_quant.leaderboard.plots import heatmap_svg, sensitivity_cells, variant

    out = tmp_path / "heat"
    sweep_into(out, tmp_path, tasks=["vqav2_val_local"], axes={"method": ["rtn"], "component": ["vit", "llm", "all"],
                                                                 "bits": [4, 8]},
               include=[{"method": "rtn", "vit_bits": 4, "llm_bits": 8}])
    collection = collect_runs(out)
    table = build_table(collection)
    rows = {r["id"]: r for r in table.rows}
    rtn = variant(next(r for r in collection.runs if r.method == "rtn"))
    assert {variant(r) for r in collection.runs if r.method == "rtn"} == {rtn}  # one variant: rtn's settings
    cells, left_out = sensitivity_cells(collection.runs, rows, "vqav2_val_local", "exact_match", rtn)
    labels = {where: [r["label"] for r in found] for where, found in cells.items()}
    assert labels == {("vit", 4): ["method=rtn component=vit bits=4"], ("vit", 8): ["method=rtn component=vit bits=8"],
                      ("llm", 4): ["method=rtn component=llm bits=4"], ("llm", 8): ["method=rtn component=llm bits=8"],
                      ("all", 4): ["method=rtn component=all bits=4"], ("all", 8): ["method=rtn component=all bits=8"]}
    assert left_out == 1  # vit at 4 and llm at 8 bits: in no cell
    key = "d:vqav2_val_local:exact_match"
    vit4 = _row(table, "method=rtn component=vit bits=4")
    svg = heatmap_svg("tiny-blip2", "vqav2_val_local", "exact_match", rtn, collection.runs, rows, True)
    cell_titles = re.findall(r'<rect class="cell"[^>]*><title>([^<]*)</title>', svg)
    assert f"vit at 4 bits: method=rtn component=vit bits=4: Δ {vit4[key]:+.4f}" in cell_titles[0]
    assert len(cell_titles) == 6
    row_names = re.findall(r'text-anchor="end">([^<]+)</text>', svg)
    assert row_names == ["vit", "connector", "llm", "all"]
    assert svg.count(">not run</text>") == 2  # the connector was never quantized alone
    assert "1 configuration(s) quantizing several components at mixed widths: in no cell" in svg


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = [(16, 0.70), (4.5, 0.69), (4.5, 0.60), (3.5, 0.40), (8, 0.65), (2.3, 0.05), (6, 0.69)]
    assert sorted(pareto_frontier(points)) == [0, 1, 3, 5]
    # lower is better (an error rate): the frontier flips
    assert sorted(pareto_frontier([(4, 0.1), (8, 0.05), (6, 0.2)], higher_is_better=False)) == [0, 1]


# --------------------------------------------------------------------------- the page in Chromium


class _TableRows(HTMLParser):
    """Per body row of #leaderboard: (hidden, {column key: data-value})."""

    def __init__(self):
        super().__init__()
        self.keys, self.rows, self.in_body, self.cell = [], [], False, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "th" and "data-key" in attrs:
            self.keys.append(attrs["data-key"])
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.rows.append(("hidden" in attrs, {}))
            self.cell = 0
        elif tag == "td" and self.in_body:
            self.rows[-1][1][self.keys[self.cell]] = attrs.get("data-value", "")
            self.cell += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _dom_rows(tmp_path, page: Path, query: str):
    dom = _chromium(tmp_path, f"{page.as_uri()}{query}", "--dump-dom").stdout
    assert 'data-ready="1"' in dom  # the page's script ran to the end
    parser = _TableRows()
    parser.feed(dom)
    return parser.rows


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/bootstrap.sh test "
                                                               "installs Debian's chromium package)")


@needs_chromium
def test_page_in_chromium_has_one_row_per_configuration_and_sorts_by_a_column(runs_dir, tmp_path):
    files, _ = write_leaderboard(runs_dir, tmp_path)
    page = files["leaderboard.html"]
    unsorted = _dom_rows(tmp_path, page, "")
    assert len(unsorted) == 9 and not any(hidden for hidden, _ in unsorted)

    def column(rows, key, cast=float):
        return [cast(values[key]) for _, values in rows]

    bpw_up = column(_dom_rows(tmp_path, page, "?sort=bpw"), "bpw")
    assert bpw_up == sorted(bpw_up) and bpw_up != column(unsorted, "bpw")
    bpw_down = column(_dom_rows(tmp_path, page, "?sort=bpw&desc=1"), "bpw")
    assert bpw_down == sorted(bpw_down, reverse=True)
    key = "m:vqav2_val_local:exact_match"
    scores = column(_dom_rows(tmp_path, page, f"?sort={key}&desc=1"), key)
    assert scores == sorted(scores, reverse=True)
    labels = column(_dom_rows(tmp_path, page, "?sort=label"), "label", str)
    assert labels == sorted(labels, key=str.lower)
    # filtering keeps the rows that contain every word
    filtered = _dom_rows(tmp_path, page, "?filter=gptq%20llm")
    visible = [values["label"] for hidden, values in filtered if not hidden]
    assert sorted(visible) == ["method=gptq component=llm bits=4", "method=gptq component=llm bits=8"]


@needs_chromium
def test_page_in_chromium_renders_the_plots(runs_dir, tmp_path):
    from PIL import Image

    files, table = write_leaderboard(runs_dir, tmp_path)
    html_text = files["leaderboard.html"].read_text()
    assert not re.search(r"""(src|href)=["']https?://""", html_text)  # self-contained: nothing to fetch
    svgs = re.findall(r'<svg class="pareto" data-task="([^"]+)"', html_text)
    assert sorted(svgs) == sorted(TASKS)  # one Pareto plot per task
    assert html_text.count('class="frontier"') == 2
    assert len(re.findall(r'<svg class="heatmap"', html_text)) == 4  # per task x method (rtn, gptq)

    shot = tmp_path / "leaderboard.png"  # kept as the test's artefact
    _chromium(tmp_path, files["leaderboard.html"].as_uri(), f"--screenshot={shot}", "--window-size=1400,2200",
              "--hide-scrollbars")
    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - 255).sum(axis=1) > 30).mean() > 0.02  # not blank
    # the plotted points are drawn: each method's marker colour appears on screen
    for method, colour in (("fp16", "#1f77b4"), ("gptq", "#d62728"), ("rtn", "#2ca02c")):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 40).sum() > 50, (method, colour)
    # the heatmap's cells are drawn (diverging red for a loss)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 150) & (pixels[:, 2] < 150)).sum() > 200


_RECORD_BOXES = """<script>
(function () {
  var wanted = ['model', 'label', 'bpw'].map(function (k) { return '#leaderboard th[data-key="' + k + '"]'; });
  var cells = document.querySelectorAll(wanted.join(', ') + ', #leaderboard th.headline');
  var table = document.getElementById('leaderboard');
  var boxes = Array.prototype.map.call(cells, function (th) {
    var column = Array.prototype.indexOf.call(th.parentNode.cells, th);
    var box = function (el) { var r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    return {key: th.getAttribute('data-key'), header: box(th), first_row: box(table.tBodies[0].rows[1].cells[column])};
  });
  var hidden = Array.prototype.filter.call(table.tHead.rows[0].cells, function (th) {
    return th.classList.contains('detail') && th.getBoundingClientRect().width > 0; }).length;
  document.body.setAttribute('data-boxes', JSON.stringify(
    {width: window.innerWidth, height: window.innerHeight, boxes: boxes, visible_details: hidden}));
})();
</script></body>"""


@needs_chromium
def test_first_screen_of_the_page_shows_model_configuration_bpw_and_every_headline_metric(tmp_path):
    import html as html_module
    import json

    out = tmp_path / "wide"
    # four tasks (captions, VQA, GQA, retrieval) and the demo's longest labels
    sweep_into(out, tmp_path, tasks=["coco2017_cap_val_local", "vqav2_val_local", "gqa_local", "flickr30k_retrieval_local"],
               axes={"method": ["rtn"], "granularity": ["uniform"], "bits": [2], "component": ["connector", "all"]},
               include=[{"method": "awq", "bits": 3, "component": "all"}])
    files, table = write_leaderboard(out, tmp_path / "lb")
    assert len(table.headlines) == 4
    page = files["leaderboard.html"]
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", _RECORD_BOXES))

    def measured(query=""):
        dom = _chromium(tmp_path, probe.as_uri() + query, "--dump-dom", "--window-size=1280,800").stdout
        return json.loads(html_module.unescape(re.search(r'data-boxes="([^"]*)"', dom).group(1)))

    first = measured()
    # headless Chromium's --dump-dom viewport is the window less its (invisible) browser frame: at most
    # 1280 x 800, so what fits there fits on a 1280 x 800 screen
    width, height = first["width"], first["height"]
    assert width == 1280 and 600 <= height <= 800
    keys = [b["key"] for b in first["boxes"]]
    assert keys == ["model", "label", "bpw"] + [f"{p}:{h.task}:{h.metric}" for h in table.headlines for p in "md"]
    for box in first["boxes"]:  # the header cell and the first configuration's cell of each column
        for left, top, right, bottom in (box["header"], box["first_row"]):
            assert 0 <= left < right <= width and 0 <= top < bottom <= height, box
    assert first["visible_details"] == 0  # the other columns wait behind "all metrics"
    assert measured("?all=1")["visible_details"] == sum(not c.compact for c in table.columns)
    _chromium(tmp_path, page.as_uri(), f"--screenshot={tmp_path / 'first-screen.png'}", "--window-size=1280,800")


def test_python_dash_m_runs_the_leaderboard(runs_dir, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["lmms_quant.leaderboard", str(runs_dir), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("lmms_quant.leaderboard", run_name="__main__")
    assert exited.value.code == 0
    assert (tmp_path / "leaderboard.md").is_file() and "9 configurations" in capsys.readouterr().out


def test_a_runs_recipe_keys_are_its_plan_and_the_rest_its_wrapper_arguments_for_every_wrapper():
    from lmms_quant.leaderboard.collect import split_model_args

    args = {"model": "llava_hf", "pretrained": "/ckpt", "method": "gptq", "bits": "4", "component": "vit"}
    # `quant` (lmms-eval's own models) keeps its wrapped model's keys beside the recipe, as the sweep splits them
    assert split_model_args("quant", args) == ({"model": "llava_hf", "pretrained": "/ckpt"},
                                               {"method": "gptq", "bits": "4", "component": "vit"})
    assert split_model_args("quant_blip2", {"pretrained": "/b", "dtype": "float32", "method": "fp16"}) == (
        {"pretrained": "/b", "dtype": "float32"}, {"method": "fp16"})
    assert split_model_args("llava_hf", {"pretrained": "/ckpt"}) is None  # not an lmms-quant model
