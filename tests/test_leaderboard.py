"""`lmms-quant leaderboard`: one row per finished configuration with bits, bpw, size, metrics and Δ vs
the FP16 baseline (bootstrap CI from logged samples where the metric is a per-document mean), as
Markdown, CSV and a self-contained HTML page that works in a real (headless) browser.

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
from lmms_quant.sweep import SweepRunner, load_grid

FAKE_EVAL = [sys.executable, str(Path(__file__).with_name("fake_eval_output.py"))]
TASKS = ["vqav2_val_local", "coco2017_cap_val_local"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


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


def test_corpus_metric_gets_a_delta_without_ci_and_says_why(table):
    base = _row(table, "fp16 baseline")
    key = "coco2017_cap_val_local:coco_CIDEr"
    row = _row(table, "method=gptq component=vit bits=8")
    assert row[f"d:{key}"] == pytest.approx(row[f"m:{key}"] - base[f"m:{key}"])
    assert row[f"d:{key}:ci_low"] is None and row[f"d:{key}:ci_high"] is None
    assert _shown(table, "method=gptq component=vit bits=8")[f"d:{key}"].endswith("(CI n/a)")
    assert any("coco_CIDEr" in n and "corpus-level" in n for n in table.notes)


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
