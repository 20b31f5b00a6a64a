"""`lmms-quant sweep`: a grid file is validated whole before anything runs, expands to configurations
(FP16 baseline always included), and runs resumably — a sweep killed with SIGKILL in the middle of a
configuration, rerun with the same command, finishes with exactly one result per configuration,
recomputes nothing that had finished, and gives the same leaderboard as an uninterrupted sweep.

Most tests evaluate through tests/fake_eval_output.py, a stand-in for the `lmms-quant eval`
subprocess that writes lmms-eval's output layout instantly; one end-to-end test runs the real thing
on the tiny BLIP-2 fixture.
"""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmms_quant import sweep
from lmms_quant.sweep import GridError, Progress, Slot, SweepRunner, load_grid, make_slots
from lmms_quant.sweep.rundir import sweep_lock
from lmms_quant.sweep.scheduler import fmt_duration

FAKE_EVAL = [sys.executable, str(Path(__file__).with_name("fake_eval_output.py"))]
REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def write_grid(tmp_path, name="grid.yaml", **overrides):
    grid = {
        "model": "quant_blip2",
        "model_args": {"pretrained": "/checkpoints/tiny-blip2", "dtype": "float32"},
        "tasks": ["vqav2_val_local"],
        "axes": {"method": ["rtn"], "bits": [4, 8]},
        "output_dir": str(tmp_path / "out"),
    }
    grid.update(overrides)
    grid = {k: v for k, v in grid.items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run_dirs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in (out / "runs").iterdir() if p.is_dir()} if (out / "runs").exists() else {}


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sweep_cli(grid: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmms_quant.sweep", str(grid), "--gpus", "none",
            "--eval-command", shlex.join(FAKE_EVAL), *extra]


# --------------------------------------------------------------------------- grid validation


@pytest.mark.parametrize("change,named", [
    ({"axez": {"bits": [4]}}, ["axez", "axes"]),                                   # unknown top-level key
    ({"axes": {"method": ["rtn"], "bitz": [4]}}, ["bitz", "bits"]),                # unknown plan key
    ({"axes": {"method": ["rtn"], "bits": [4, 9]}}, ["bits=9", "2, 3, 4, 5, 6, 7, 8"]),  # bad value
    ({"axes": {"method": ["rtn", "gptqq"]}}, ["gptqq", "gptq"]),                   # bad method
    ({"model_args": {"pretrained": "/x", "dtype": "float17"}}, ["dtype", "float17", "float32"]),
    ({"model": "quant_blip3"}, ["quant_blip3", "quant_blip2"]),
    ({"tasks": ["vqav2_val_locl"]}, ["vqav2_val_locl", "vqav2_val_local"]),
    ({"limit": 0}, ["limit", "0"]),
    ({"exclude": [{"group_size": 64}]}, ["exclude[0].group_size", "not an axis"]),
    ({"exclude": [{"bits": 3}]}, ["exclude[0].bits", "3"]),
    ({"include": [{"method": "awq", "bits": 4, "damp": 0.1}]}, ["include[0]", "damp"]),
    ({"axes": {"method": ["rtn"], "bits": [4, 4]}}, ["axes.bits", "'4'"]),
    ({"axes": {"bits": [4], "dtype": ["float32"]}}, ["axes.dtype", "model_args"]),
    ({"batch_size": "two"}, ["batch_size", "two"]),
])
def test_bad_grid_fails_before_anything_runs_naming_the_key(tmp_path, change, named, capsys, monkeypatch):
    events = tmp_path / "events.jsonl"
    grid = write_grid(tmp_path, **change)
    monkeypatch.setenv("FAKE_EVAL_LOG", str(events))
    code = sweep.main([str(grid), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)])
    err = capsys.readouterr().err
    assert code == 2
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()  # nothing written, nothing run
    assert not events.exists()


def test_grid_expands_product_minus_exclude_plus_include_with_the_baseline_first(tmp_path):
    grid = load_grid(write_grid(
        tmp_path, model_args={"pretrained": "/ckpt", "dtype": "float32", "calib_n": 8},
        axes={"method": ["rtn", "gptq"], "bits": [4, 8]},
        exclude=[{"method": "gptq", "bits": 8}],
        include=[{"method": "awq", "bits": 4}, {"method": "rtn", "bits": 4}]))  # the last repeats the product
    labels = [c.label for c in grid.configurations]
    assert labels == ["fp16 baseline", "method=rtn bits=4", "method=rtn bits=8", "method=gptq bits=4",
                      "method=awq bits=4"]
    baseline = grid.configurations[0]
    assert baseline.is_baseline and "method=fp16" in baseline.model_args
    assert "calib_n" not in baseline.model_args  # fixed plan keys do not apply to fp16
    assert all("calib_n=8" in c.model_args for c in grid.configurations[1:])
    # canonical: defaults spelled out, pretrained first, the lmms-quant version folded in
    rtn4 = grid.configurations[1]
    assert rtn4.model_args.startswith("pretrained=/ckpt,")
    assert "group_size=128" in rtn4.model_args and "lmms_quant_version=" in rtn4.model_args
    assert len({c.run_id for c in grid.configurations}) == 5


def test_a_grid_without_axes_is_its_include_list_plus_the_baseline(tmp_path):
    grid = load_grid(write_grid(
        tmp_path, model_args={"pretrained": "/ckpt", "dtype": "float32", "calib_n": 8}, axes=None,
        include=[{"method": "gptq", "bits": 3, "component": "vit"}, {"method": "awq", "bits": 4}]))
    assert [c.label for c in grid.configurations] == [
        "fp16 baseline", "method=gptq bits=3 component=vit", "method=awq bits=4"]


def test_run_id_changes_with_everything_that_changes_the_result(tmp_path):
    def ids(**change):
        return [c.run_id for c in load_grid(write_grid(tmp_path, **change)).configurations]

    base = ids()
    assert ids() == base  # stable
    assert ids(output_dir=str(tmp_path / "elsewhere")) == base  # where results go is not what they are
    assert ids(limit=5) != base
    assert ids(seed="1,2,3,4") != base
    assert ids(batch_size=4) != base
    assert ids(tasks=["gqa_local"]) != base
    assert ids(model_args={"pretrained": "/checkpoints/tiny-blip2", "dtype": "float16"})[1:] != base[1:]
    # spelling of one plan does not matter: group_size 128 is the default
    assert ids(axes={"method": ["rtn"], "bits": [4, 8], "group_size": [128]}) == base


def test_one_baseline_per_unquantized_model(tmp_path):
    grid = load_grid(write_grid(tmp_path, model_args={"pretrained": "/ckpt"},
                                axes={"method": ["rtn"], "bits": [4], "dtype": ["float32", "bfloat16"]}))
    baselines = [c for c in grid.configurations if c.is_baseline]
    assert [c.label for c in baselines] == ["fp16 baseline dtype=float32", "fp16 baseline dtype=bfloat16"]
    assert all("method=fp16" in c.model_args for c in baselines)


# --------------------------------------------------------------------------- running


def test_sweep_runs_each_configuration_once_and_skips_finished_ones(tmp_path, capsys, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("FAKE_EVAL_LOG", str(events))
    grid = write_grid(tmp_path)
    assert sweep.main([str(grid), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    out = capsys.readouterr().out
    assert "configuration 1 of 3: fp16 baseline" in out and "configuration 3 of 3" in out and "ETA" in out
    dirs = run_dirs(tmp_path / "out")
    assert len(dirs) == 3
    for run_dir in dirs.values():
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "ok" and record["run_id"] == run_dir.name
        assert len(sweep.find_results_files(run_dir / "lmms_eval")) == 1
    assert len([e for e in log_events(events) if e["event"] == "start"]) == 3
    assert sweep.main([str(grid), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    assert "already complete, skipped" in capsys.readouterr().out
    assert len([e for e in log_events(events) if e["event"] == "start"]) == 3  # nothing ran again


def test_failed_configuration_is_recorded_not_taken_for_a_result_and_retried(tmp_path, monkeypatch, capsys):
    grid = write_grid(tmp_path)
    monkeypatch.setenv("FAKE_EVAL_FAIL_ON", "llm_bits=8")
    monkeypatch.setenv("FAKE_EVAL_NO_RESULTS", "llm_bits=4")  # exits 0 yet writes no results
    assert sweep.main([str(grid), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)]) == 1
    records = [json.loads((d / "run.json").read_text()) for d in run_dirs(tmp_path / "out").values()]
    status = {r["label"]: (r["status"], r["error"]) for r in records}
    assert status["fp16 baseline"] == ("ok", None)
    assert status["method=rtn bits=8"] == ("failed", "lmms-quant eval exited with status 1")
    assert status["method=rtn bits=4"] == ("failed", "expected one lmms-eval results file, found 0")
    failed_ids = [r["run_id"] for r in records if r["status"] == "failed"]
    assert all(sweep.completed_run(tmp_path / "out" / "runs" / i) is None for i in failed_ids)
    monkeypatch.delenv("FAKE_EVAL_FAIL_ON")
    monkeypatch.delenv("FAKE_EVAL_NO_RESULTS")
    assert sweep.main([str(grid), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    assert all(sweep.completed_run(tmp_path / "out" / "runs" / i) for i in failed_ids)


def test_leftovers_of_an_interrupted_configuration_are_removed_before_it_reruns(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    runner = SweepRunner(grid.output_dir, eval_command=FAKE_EVAL, stream=io.StringIO())
    config = grid.configurations[1]
    stale = runner.run_dir(config) / "lmms_eval" / "x__y"
    stale.mkdir(parents=True)
    (stale / "20200101_000000_results.json").write_text("{}")  # looks like a result, but no run.json
    (runner.run_dir(config) / "config.json").write_text("{}")
    assert runner.run([config]) == {config.run_id: "ok"}
    assert not stale.exists()
    assert len(sweep.find_results_files(runner.run_dir(config) / "lmms_eval")) == 1


def test_two_sweeps_cannot_share_an_output_directory(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    with sweep_lock(grid.output_dir):  # what a first sweep holds while it runs
        with pytest.raises(GridError, match="another sweep is running"):
            SweepRunner(grid.output_dir, eval_command=FAKE_EVAL).run(grid.configurations)


def test_sigkill_mid_configuration_then_rerun_finishes_without_recomputing(tmp_path):
    """The issue's acceptance test, on the stand-in evaluator (the real one: the e2e test below)."""
    grid = write_grid(tmp_path, tasks=["vqav2_val_local", "coco2017_cap_val_local"])
    out = tmp_path / "out"
    events = tmp_path / "events.jsonl"
    # configuration 2 of 3 (rtn 4-bit) hangs after writing its samples: a half-written run directory
    env = _env(FAKE_EVAL_LOG=events, FAKE_EVAL_SLEEP=300, FAKE_EVAL_SLEEP_ON="llm_bits=4")
    proc = subprocess.Popen(sweep_cli(grid), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline and victim is None:
        starts = [e for e in log_events(events) if e["event"] == "start" and "llm_bits=4" in e["model_args"]]
        if starts and list(Path(starts[0]["output_path"]).glob("*/*_samples_*.jsonl")):
            victim = starts[0]
        time.sleep(0.1)
    assert victim is not None, proc.stdout.read().decode() if proc.poll() is not None else "timed out"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_dead(victim["pid"])  # the evaluator dies with the sweep: no orphan keeps writing

    dirs = run_dirs(out)
    finished = {k: d for k, d in dirs.items() if sweep.completed_run(d)}
    assert len(dirs) == 2 and len(finished) == 1  # baseline done, rtn-4 half-written, rtn-8 not started
    partial = next(d for k, d in dirs.items() if k not in finished)
    assert not (partial / "run.json").exists() and list(partial.glob("lmms_eval/*/*_samples_*.jsonl"))
    before = {k: ((d / "run.json").stat().st_mtime_ns, (d / "run.json").read_bytes(),
                  sweep.find_results_files(d / "lmms_eval")) for k, d in finished.items()}

    resumed = subprocess.run(sweep_cli(grid), env=_env(FAKE_EVAL_LOG=events), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already complete, skipped" in resumed.stdout
    dirs = run_dirs(out)
    assert len(dirs) == 3
    for key, run_dir in dirs.items():
        assert sweep.completed_run(run_dir)
        assert len(sweep.find_results_files(run_dir / "lmms_eval")) == 1  # exactly one result each
        for task in ("vqav2_val_local", "coco2017_cap_val_local"):
            assert len(list(run_dir.glob(f"lmms_eval/*/*_samples_{task}.jsonl"))) == 1
    for key, (mtime, content, results) in before.items():  # finished ones were not recomputed
        run_json = dirs[key] / "run.json"
        assert (run_json.stat().st_mtime_ns, run_json.read_bytes()) == (mtime, content)
        assert sweep.find_results_files(dirs[key] / "lmms_eval") == results
    starts = [e["output_path"] for e in log_events(events) if e["event"] == "start"]
    assert sorted(starts.count(str(d / "lmms_eval")) for d in dirs.values()) == [1, 1, 2]

    # the leaderboard equals that of an uninterrupted sweep of the same grid
    from lmms_quant.leaderboard import write_leaderboard

    clean_grid = write_grid(tmp_path, name="clean.yaml", tasks=["vqav2_val_local", "coco2017_cap_val_local"],
                            output_dir=str(tmp_path / "clean"))
    clean = subprocess.run(sweep_cli(clean_grid), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    resumed_files, resumed_table = write_leaderboard(out)
    clean_files, _ = write_leaderboard(tmp_path / "clean")
    assert len(resumed_table.rows) == 3
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert resumed_files[name].read_bytes() == clean_files[name].read_bytes(), name


def _wait_dead(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):  # dead, waiting to be reaped by whoever adopted it
            return
        time.sleep(0.1)
    raise AssertionError(f"evaluator process {pid} outlived the killed sweep")


# --------------------------------------------------------------------------- several GPUs, progress


def test_slots_one_per_gpu_or_per_group_with_accelerate():
    assert make_slots([]) == [Slot()]
    assert make_slots([0, 1, 3]) == [Slot((0,)), Slot((1,)), Slot((3,))]
    groups = make_slots([0, 1, 2, 3, 4], processes_per_config=2)
    assert groups == [Slot((0, 1)), Slot((2, 3))]  # GPU 4 alone cannot hold a 2-GPU configuration
    assert groups[1].env() == {"CUDA_VISIBLE_DEVICES": "2,3"}
    launcher = groups[0].launcher()
    assert launcher[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in launcher
    assert launcher[launcher.index("--num_processes") + 1] == "2"
    assert Slot((5,)).launcher() == [] and Slot().env() == {}
    with pytest.raises(GridError, match="processes_per_config"):
        make_slots([0], processes_per_config=2)


def test_configurations_run_in_parallel_one_per_gpu(tmp_path, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("FAKE_EVAL_LOG", str(events))
    monkeypatch.setenv("FAKE_EVAL_SLEEP", "1.5")
    grid = load_grid(write_grid(tmp_path, axes={"method": ["rtn"], "bits": [3, 4, 8]}))
    runner = SweepRunner(grid.output_dir, slots=make_slots([0, 1]), eval_command=FAKE_EVAL, stream=io.StringIO(),
                         poll_interval=0.05)
    outcome = runner.run(grid.configurations)
    # overlap of spans on different GPUs (below) shows the parallelism; no wall-clock bound (a loaded CI box)
    assert sorted(outcome.values()) == ["ok"] * 4
    log = log_events(events)
    starts = [e for e in log if e["event"] == "start"]
    assert len(starts) == 4 and {e["cuda"] for e in starts} == {"0", "1"}
    # at any time at most one configuration per GPU, and two GPUs busy at once
    intervals = {}
    for e in log:
        intervals.setdefault(e["pid"], {})[e["event"]] = (e["time"], e["cuda"])
    spans = [(v["start"][0], v["end"][0], v["start"][1]) for v in intervals.values()]
    for gpu in ("0", "1"):
        mine = sorted(s for s in spans if s[2] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:]))
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a[2] != b[2])


def test_progress_reports_k_of_n_elapsed_and_eta():
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(total=5, n_slots=2, stream=stream, clock=lambda: now[0])
    assert progress.eta(pending=3, running_elapsed=[1.0]) is None  # nothing finished yet: unknown
    progress.durations += [10.0, 20.0]  # mean 15 s
    # 2 pending (30 s of work) + one running for 5 s (10 s left), over 2 slots
    assert progress.eta(pending=2, running_elapsed=[5.0]) == pytest.approx(20.0)
    assert fmt_duration(3725) == "1h02m05s" and fmt_duration(None) == "unknown"


def test_dry_run_lists_configurations_and_runs_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path)
    assert sweep.main([str(grid), "--dry-run", "--gpus", "none"]) == 0
    out = capsys.readouterr().out
    assert "3 configurations" in out and "method=rtn bits=8" in out
    assert not (tmp_path / "out" / "runs").exists()


# --------------------------------------------------------------------------- end to end, real lmms-eval


def _engine_ready() -> str | None:
    try:
        import lmms_quant.model_wrappers.blip2  # noqa: F401
        from lmms_quant.quant import Recipe, quantize  # noqa: F401
    except ImportError as err:
        return f"the BLIP-2 wrapper and the engine are needed ({err})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_engine_ready() is not None, reason=str(_engine_ready()))
def test_real_sweep_killed_and_resumed_matches_an_uninterrupted_one(tmp_path, tiny_checkpoints, data_root):
    common = dict(model_args={"pretrained": str(tiny_checkpoints["blip2_opt"]), "dtype": "float32", "calib_n": 4},
                  tasks=["vqav2_val_local"], axes={"method": ["rtn"], "bits": [4, 8]}, limit=4, batch_size=2,
                  data_root=str(data_root))
    grid = write_grid(tmp_path, **common)
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "lmms_quant.sweep", str(grid), "--gpus", "none"]
    proc = subprocess.Popen(cli, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = run_dirs(out)
        done = [d for d in dirs.values() if sweep.completed_run(d)]
        running = [d for d in dirs.values() if not (d / "run.json").exists()]
        log = running[0] / "log.txt" if running else None
        if len(done) == 1 and log and log.exists() and b"lmms-quant: quantizing" in log.read_bytes():
            proc.send_signal(signal.SIGKILL)  # configuration 2 has loaded its model and is quantizing
            killed = True
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed, proc.stdout.read().decode()[-3000:]
    finished = {d.name: (d / "run.json").stat().st_mtime_ns for d in run_dirs(out).values() if sweep.completed_run(d)}
    assert len(finished) == 1

    resumed = subprocess.run(cli, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    dirs = run_dirs(out)
    assert len(dirs) == 3 and all(sweep.completed_run(d) for d in dirs.values())
    assert all(len(sweep.find_results_files(d / "lmms_eval")) == 1 for d in dirs.values())
    assert {k: (dirs[k] / "run.json").stat().st_mtime_ns for k in finished} == finished
    quantized = [d for d in dirs.values() if not json.loads((d / "run.json").read_text())["is_baseline"]]
    assert all(list(d.glob("lmms_eval/*/quant_report_*.json")) for d in quantized)

    clean_grid = write_grid(tmp_path, name="clean.yaml", output_dir=str(tmp_path / "clean"), **common)
    clean = subprocess.run([sys.executable, "-m", "lmms_quant.sweep", str(clean_grid), "--gpus", "none"],
                           env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    from lmms_quant.leaderboard import write_leaderboard

    mine, table = write_leaderboard(out)
    theirs, _ = write_leaderboard(tmp_path / "clean")
    assert len(table.rows) == 3
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert mine[name].read_bytes() == theirs[name].read_bytes(), name


def test_relative_paths_in_a_grid_file_are_relative_to_the_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "ckpt").mkdir()
    grid = write_grid(project, output_dir="sweeps/a", data_root="data",
                      model_args={"pretrained": "./ckpt", "dtype": "float32"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_grid(grid)
    assert loaded.output_dir == project / "sweeps" / "a"
    assert all(c.data_root == str(project / "data") for c in loaded.configurations)
    assert all(c.model_args.startswith(f"pretrained={project / 'ckpt'},") for c in loaded.configurations)
    default = load_grid(write_grid(project, name="other.yaml", output_dir=None))
    assert default.output_dir == project / "runs" / "other"


def test_status_shows_not_started_done_and_failed_with_the_log_and_its_last_error(tmp_path, monkeypatch, capsys):
    grid = write_grid(tmp_path)
    fake = shlex.join(FAKE_EVAL)
    assert sweep.main([str(grid), "--status"]) == 0
    assert "3 configurations: 0 done, 0 running, 0 failed, 3 not started" in capsys.readouterr().out
    monkeypatch.setenv("FAKE_EVAL_FAIL_ON", "llm_bits=8")
    assert sweep.main([str(grid), "--gpus", "none", "--eval-command", fake]) == 1
    capsys.readouterr()
    assert sweep.main([str(grid), "--status"]) == 0
    status = capsys.readouterr().out
    failed = next(c for c in load_grid(grid).configurations if c.label == "method=rtn bits=8")
    assert "2 done, 0 running, 1 failed, 0 not started" in status
    assert f"failed       {failed.run_id}  method=rtn bits=8" in status
    assert "lmms-quant eval exited with status 1" in status and "last error: fake eval: failing as asked" in status
    assert f"log: {tmp_path / 'out' / 'runs' / failed.run_id / 'log.txt'}" in status
