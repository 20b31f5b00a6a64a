"""`lmms-quant sweep` beyond one machine: configurations as submitit jobs, with the local sweep's resume
guarantees — a finished configuration is never resubmitted, a job that died leaves nothing that counts
and is resubmitted by the next sweep, a running one is waited for, not duplicated — and `--status`.

The jobs are real: submitit's LocalExecutor (`executor: submitit-local`) starts each as detached
processes on this machine, through the same code path as SLURM. SLURM itself is stood in for by
three small scripts (sbatch, srun, sacct) that record what is submitted and report the job states a
test writes, so the sbatch script and the state handling are checked without a cluster. Evaluations
use tests/fake_eval_output.py.
"""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from test_sweep import FAKE_EVAL, _env, _wait_dead, log_events, run_dirs, write_grid  # noqa: E402

from lmms_quant import sweep  # noqa: E402
from lmms_quant.sweep import GridError, load_grid  # noqa: E402
from lmms_quant.sweep.cluster import SubmititRunner  # noqa: E402
from lmms_quant.sweep.job import run_configuration  # noqa: E402
from lmms_quant.sweep.rundir import JOB_FILE, find_results_files, read_json  # noqa: E402

LOCAL_JOBS = {"name": "submitit-local", "timeout_min": 30}
TIMEOUT = 240  # generous: a loaded 2-core machine starts each job's Python processes slowly


def sweep_cli(grid: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmms_quant.sweep", str(grid), "--eval-command", shlex.join(FAKE_EVAL), *extra]


def wait_until(condition, what: str, timeout: float = TIMEOUT, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def blocked_victim(events: Path, needle: str = "llm_bits=4"):
    """The start event of the evaluation that waits at the gate, once it has written its samples."""
    for event in log_events(events):
        if event["event"] == "start" and needle in event["model_args"]:
            if list(Path(event["output_path"]).glob("*/*_samples_*.jsonl")):
                return event
    return None


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def start_counts(events: Path, out: Path) -> list[int]:
    starts = [e["output_path"] for e in log_events(events) if e["event"] == "start"]
    return sorted(starts.count(str(d / "lmms_eval")) for d in run_dirs(out).values())


# --------------------------------------------------------------------------- the executor section


@pytest.mark.parametrize("executor,named", [
    ({"name": "slrum"}, ["executor.name", "slrum", "local, slurm, submitit-local"]),
    ({"name": "slurm", "partition": "gpu"}, ["'partition'", "'gpu'", "slurm_partition", "valid keys"]),
    ({"name": "slurm", "timeout_min": 60, "gpus_per_node": "two"}, ["executor.gpus_per_node", "'two'", ">= 0"]),
    ({"name": "slurm", "timeout_min": 0}, ["executor.timeout_min", "0", ">= 1"]),
    ({"name": "slurm"}, ["executor.timeout_min", "required for slurm"]),
    ({"name": "slurm", "timeout_min": 60, "slurm_additional_parameters": {"array": "0-3"}},
     ["slurm_additional_parameters", "array", "submitit"]),
    ({"name": "slurm", "timeout_min": 60, "slurm_additional_parameters": {"partition": "gpu"}},
     ["slurm_additional_parameters", "slurm_partition"]),
    ({"name": "slurm", "timeout_min": 60, "slurm_setup": "module load cuda"}, ["executor.slurm_setup", "list"]),
    ({"name": "slurm", "timeout_min": 60, "mem_gb": -1}, ["executor.mem_gb", "-1", "> 0"]),
])
def test_a_bad_executor_section_fails_before_anything_runs_naming_key_value_and_choices(tmp_path, executor, named,
                                                                                        capsys):
    grid = write_grid(tmp_path, executor=executor)
    assert sweep.main([str(grid), "--eval-command", shlex.join(FAKE_EVAL)]) == 2
    err = capsys.readouterr().err
    for text in named:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


def test_executor_on_the_command_line_overrides_the_grid_and_is_validated_the_same_way(tmp_path):
    grid = write_grid(tmp_path, executor={"name": "slurm", "timeout_min": 60, "slurm_partition": "gpu"})
    assert load_grid(grid).executor.name == "slurm"
    assert load_grid(grid, executor="local").executor.name == "local"  # slurm keys are ignored by local
    with pytest.raises(GridError, match="executor.timeout_min: required for slurm"):
        load_grid(write_grid(tmp_path, name="plain.yaml"), executor="slurm")
    two_gpus = write_grid(tmp_path, name="two.yaml", processes_per_config=2,
                          executor={"name": "slurm", "timeout_min": 60, "gpus_per_node": 1})
    with pytest.raises(GridError, match="gpus_per_node: value 1 is fewer than processes_per_config"):
        load_grid(two_gpus)


def test_slurm_without_sbatch_fails_with_a_clear_message_before_submitting(tmp_path, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch, srun or sacct here
    grid = write_grid(tmp_path)
    code = sweep.main([str(grid), "--executor", "slurm", "--eval-command", shlex.join(FAKE_EVAL)])
    assert code == 2 and "timeout_min" in capsys.readouterr().err  # first: the grid must say how long a job may run
    grid = write_grid(tmp_path, executor={"name": "local", "timeout_min": 60})
    code = sweep.main([str(grid), "--executor", "slurm", "--eval-command", shlex.join(FAKE_EVAL)])
    err = capsys.readouterr().err
    assert code == 2
    assert "sbatch" in err and "not found" in err and "nothing was submitted" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- SLURM, stood in for

_JOB_IDS = [100000 + os.getpid() % 1000 * 10000]
FAKE_SBATCH = """#!/bin/sh
# Records the batch script and answers like sbatch (or refuses, like sbatch given a bad partition).
if [ -n "$FAKE_SBATCH_REFUSE" ]; then echo "sbatch: error: $FAKE_SBATCH_REFUSE" >&2; exit 1; fi
n=$(cat "$FAKE_SLURM/next_id")
echo $((n + 1)) > "$FAKE_SLURM/next_id"
cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/sh
# Reports the job states the test wrote (JobID|State|NodeList lines).
echo "JobID|State|NodeList"
cat "$FAKE_SLURM/sacct.txt" 2>/dev/null
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    state = tmp_path / "slurm"
    bin_dir = state / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "srun": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # Job ids unique to this test: submitit keeps the states of finished jobs for the process's lifetime.
    _JOB_IDS[0] += 1000
    (state / "next_id").write_text(str(_JOB_IDS[0]))
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return state


def test_slurm_gets_one_job_array_with_the_grid_resources_and_a_rerun_resubmits_only_dead_jobs(tmp_path, fake_slurm,
                                                                                                capsys):
    grid = write_grid(tmp_path, executor={
        "name": "slurm", "timeout_min": 30, "gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 16,
        "slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high", "slurm_array_parallelism": 2,
        "slurm_additional_parameters": {"exclusive": True, "mail-type": "FAIL"}, "slurm_setup": ["echo set-up"]})
    out = tmp_path / "out"
    assert sweep.main([str(grid), "--no-wait", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    assert "3 running (see --status)" in capsys.readouterr().out
    scripts = sorted(fake_slurm.glob("sbatch_*.sh"))
    assert len(scripts) == 1  # one job array for the three configurations
    text = scripts[0].read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB",
                 "#SBATCH --time=30", "#SBATCH --array=0-2%2", "#SBATCH --exclusive", "#SBATCH --mail-type=FAIL",
                 "#SBATCH --job-name=lmms-quant-grid", "echo set-up", "submitit.core._submit"):
        assert line in text, line
    array = scripts[0].name[len("sbatch_"):-len(".sh")]
    loaded = load_grid(grid)
    dirs = [out / "runs" / c.run_id for c in loaded.configurations]
    records = [read_json(d / JOB_FILE) for d in dirs]
    assert [r["job_id"] for r in records] == [f"{array}_{i}" for i in range(3)]
    for run_dir, record in zip(dirs, records):  # the job runs the local sweep's command
        meta = read_json(run_dir / "config.json")
        assert meta["attempt"] == record["attempt"] and meta["command"][:2] == FAKE_EVAL
        assert f"--output_path {run_dir / 'lmms_eval'}" in shlex.join(meta["command"])

    # The first job ran (here, in this process: what the job would have done), the second hit its time
    # limit half-way, the third is still running.
    run_configuration(str(dirs[0]), records[0]["attempt"])
    job_log = Path(str(records[1]["folder"]).replace("%j", records[1]["job_id"]))
    job_log.mkdir(parents=True, exist_ok=True)
    (job_log / f"{records[1]['job_id']}_0_log.err").write_text(
        f"submitit INFO: Starting with JobEnvironment\nslurmstepd: error: *** JOB {records[1]['job_id']} ON n1 "
        "CANCELLED AT 2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n")
    (fake_slurm / "sacct.txt").write_text(f"{array}_0|COMPLETED|n1\n{array}_1|TIMEOUT|n1\n{array}_2|RUNNING|n2\n")
    assert sweep.main([str(grid), "--status"]) == 0
    status = capsys.readouterr().out
    assert "1 done, 1 running, 1 failed, 0 not started" in status
    assert f"running      {loaded.configurations[2].run_id}  method=rtn bits=8  job {array}_2 (RUNNING)" in status
    assert f"job {array}_1 ended (TIMEOUT) without a result" in status
    assert "last error: slurmstepd: error: *** JOB" in status and "DUE TO TIME LIMIT" in status
    assert f"log: {job_log / (records[1]['job_id'] + '_0_log.err')}" in status

    done_before = (dirs[0] / "run.json").read_bytes()
    assert sweep.main([str(grid), "--no-wait", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    rerun = capsys.readouterr().out
    assert "already complete, skipped" in rerun and f"still running as job {array}_2" in rerun
    scripts = sorted(fake_slurm.glob("sbatch_*.sh"))
    assert len(scripts) == 2 and "--array" not in scripts[1].read_text()  # one job: the timed-out configuration
    resubmitted = scripts[1].name[len("sbatch_"):-len(".sh")]
    assert read_json(dirs[1] / JOB_FILE)["job_id"] == resubmitted
    assert read_json(dirs[2] / JOB_FILE)["job_id"] == f"{array}_2"  # the running one was left alone
    assert (dirs[0] / "run.json").read_bytes() == done_before


def test_what_sbatch_says_when_it_refuses_a_job_reaches_the_user(tmp_path, fake_slurm, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_REFUSE", "invalid partition specified: gpux")
    grid = write_grid(tmp_path, executor={"name": "slurm", "timeout_min": 5, "slurm_partition": "gpux"})
    assert sweep.main([str(grid), "--eval-command", shlex.join(FAKE_EVAL)]) == 2
    err = capsys.readouterr().err
    assert "submitting to slurm failed" in err and "invalid partition specified: gpux" in err
    assert not list(fake_slurm.glob("sbatch_*.sh"))


def test_a_superseded_job_leaves_the_directory_alone(tmp_path, fake_slurm):
    """A job the sweep took for dead (and resubmitted) that runs after all does not write into the new attempt."""
    grid = write_grid(tmp_path, axes={"method": ["rtn"], "bits": [4]}, executor={"name": "slurm", "timeout_min": 5})
    assert sweep.main([str(grid), "--no-wait", "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    run_dir = tmp_path / "out" / "runs" / load_grid(grid).configurations[1].run_id
    old_attempt = read_json(run_dir / JOB_FILE)["attempt"]
    meta = read_json(run_dir / "config.json")
    (run_dir / "config.json").write_text(json.dumps({**meta, "attempt": "a-newer-attempt"}))
    assert run_configuration(str(run_dir), old_attempt)["status"] == "superseded"
    assert not (run_dir / "run.json").exists() and not (run_dir / "lmms_eval").exists()


# --------------------------------------------------------------------------- real jobs on this machine


def test_jobs_give_the_same_results_as_the_local_executor(tmp_path, capsys, monkeypatch):
    from lmms_quant.leaderboard import write_leaderboard

    monkeypatch.setenv("FAKE_EVAL_DOCS", "12")
    axes = {"method": ["rtn", "gptq"], "bits": [4]}
    jobs = write_grid(tmp_path, name="jobs.yaml", axes=axes, output_dir=str(tmp_path / "jobs"), executor=LOCAL_JOBS)
    local = write_grid(tmp_path, name="local.yaml", axes=axes, output_dir=str(tmp_path / "local"))
    assert sweep.main([str(jobs), "--eval-command", shlex.join(FAKE_EVAL)]) == 0
    printed = capsys.readouterr().out
    assert "3 configurations (2 + the fp16 baseline) as submitit-local jobs" in printed
    assert printed.count(" done") == 3 and "3 of 3 configurations complete" in printed
    assert sweep.main([str(local), "--gpus", "none", "--eval-command", shlex.join(FAKE_EVAL)]) == 0

    by_jobs, by_local = run_dirs(tmp_path / "jobs"), run_dirs(tmp_path / "local")
    assert set(by_jobs) == set(by_local) and len(by_jobs) == 3  # the same configurations, the same run ids
    for run_id, run_dir in by_jobs.items():
        assert read_json(run_dir / JOB_FILE)["executor"] == "submitit-local"
        mine, theirs = (find_results_files(d / "lmms_eval") for d in (run_dir, by_local[run_id]))
        assert len(mine) == len(theirs) == 1
        assert json.loads(mine[0].read_text())["results"] == json.loads(theirs[0].read_text())["results"]
        samples = sorted(p.name.split("_samples_")[1] for p in run_dir.glob("lmms_eval/*/*_samples_*.jsonl"))
        assert samples == ["vqav2_val_local.jsonl"]
        for ours in run_dir.glob("lmms_eval/*/*_samples_*.jsonl"):
            other = next(by_local[run_id].glob(f"lmms_eval/*/*_samples_{ours.name.split('_samples_')[1]}"))
            assert ours.read_bytes() == other.read_bytes()
    mine, table = write_leaderboard(tmp_path / "jobs")
    theirs, _ = write_leaderboard(tmp_path / "local")
    assert len(table.rows) == 3
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert mine[name].read_bytes() == theirs[name].read_bytes(), name


def test_a_job_killed_mid_run_is_reported_and_redone_by_the_next_sweep_and_only_it(tmp_path, monkeypatch, capsys):
    grid = write_grid(tmp_path, executor=LOCAL_JOBS)
    out, events, gate = tmp_path / "out", tmp_path / "events.jsonl", tmp_path / "gate"
    log = open(tmp_path / "sweep.log", "w")
    # configuration rtn 4-bit writes its samples, then waits at a gate that this test never opens
    proc = subprocess.Popen(sweep_cli(grid), env=_env(FAKE_EVAL_LOG=events, FAKE_EVAL_SLEEP_ON="llm_bits=4",
                                                      FAKE_EVAL_WAIT_FOR=gate),
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        victim = wait_until(lambda: blocked_victim(events), "the rtn 4-bit evaluation to be under way", proc=proc)
        wait_until(lambda: sum(bool(sweep.completed_run(d)) for d in run_dirs(out).values()) == 2,
                   "the two other configurations to finish", proc=proc)
        job_process = parent_pid(victim["pid"])
        assert b"submitit.core._submit" in Path(f"/proc/{job_process}/cmdline").read_bytes()
        os.kill(job_process, signal.SIGKILL)  # the job dies: its node failed, or SLURM killed it
        proc.wait(timeout=TIMEOUT)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
        log.close()
    printed = (tmp_path / "sweep.log").read_text()
    victim_dir = Path(victim["output_path"]).parent
    assert proc.returncode == 1, printed
    assert f"[{victim_dir.name}]" in printed and "FAILED: job" in printed and "without a result" in printed
    _wait_dead(victim["pid"])  # the evaluation died with its job
    assert not (victim_dir / "run.json").exists()  # nothing of it counts as a result
    assert list(victim_dir.glob("lmms_eval/*/*_samples_*.jsonl"))  # though it had written part of its output

    assert sweep.main([str(grid), "--status"]) == 0
    status = capsys.readouterr().out
    assert "2 done, 0 running, 1 failed, 0 not started" in status
    assert f"failed       {victim_dir.name}  method=rtn bits=4" in status and "log: " in status

    finished = {k: (d / "run.json").read_bytes() for k, d in run_dirs(out).items() if sweep.completed_run(d)}
    monkeypatch.setenv("FAKE_EVAL_LOG", str(events))
    assert sweep.main(sweep_cli(grid)[3:]) == 0
    resumed = capsys.readouterr().out
    assert resumed.count("already complete, skipped") == 2 and resumed.count("submitted as job") == 1
    dirs = run_dirs(out)
    assert all(sweep.completed_run(d) for d in dirs.values())
    assert all(len(find_results_files(d / "lmms_eval")) == 1 for d in dirs.values())
    assert {k: (dirs[k] / "run.json").read_bytes() for k in finished} == finished  # not recomputed
    assert start_counts(events, out) == [1, 1, 2]


def test_a_rerun_waits_for_a_job_that_outlived_its_sweep_instead_of_resubmitting_it(tmp_path, monkeypatch, capsys):
    grid = write_grid(tmp_path, executor=LOCAL_JOBS)
    out, events, gate = tmp_path / "out", tmp_path / "events.jsonl", tmp_path / "gate"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(sweep_cli(grid), env=_env(FAKE_EVAL_LOG=events, FAKE_EVAL_SLEEP_ON="llm_bits=4",
                                                       FAKE_EVAL_WAIT_FOR=gate),
                             cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    second, printed = None, io.StringIO()
    try:
        victim = wait_until(lambda: blocked_victim(events), "the rtn 4-bit evaluation to be under way", proc=first)
        wait_until(lambda: sum(bool(sweep.completed_run(d)) for d in run_dirs(out).values()) == 2,
                   "the two other configurations to finish", proc=first)
        first.send_signal(signal.SIGKILL)  # the sweep dies; its jobs, detached, go on
        first.wait(timeout=TIMEOUT)
        job_id = read_json(Path(victim["output_path"]).parent / JOB_FILE)["job_id"]
        assert sweep.main([str(grid), "--status"]) == 0
        assert f"method=rtn bits=4  job {job_id} (RUNNING)" in capsys.readouterr().out

        loaded = load_grid(grid)
        runner = SubmititRunner(loaded.output_dir, loaded.executor, eval_command=FAKE_EVAL, stream=printed,
                                poll_interval=0.2)
        outcome = {}
        second = threading.Thread(target=lambda: outcome.update(runner.run(loaded.configurations)))
        second.start()
        wait_until(lambda: f"still running as job {job_id}" in printed.getvalue(),
                   "the second sweep to find the running job")
        gate.touch()
        second.join(timeout=TIMEOUT)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
        log.close()
    assert second is not None and not second.is_alive()
    assert sorted(outcome.values()) == ["ok", "skipped", "skipped"], printed.getvalue()
    assert f"(job {job_id}) done" in printed.getvalue()
    assert all(sweep.completed_run(d) for d in run_dirs(out).values()) and len(run_dirs(out)) == 3
    assert start_counts(events, out) == [1, 1, 1]  # nothing computed twice


def test_a_cache_entry_asked_for_by_two_jobs_at_once_is_built_once_and_whole(tmp_path, monkeypatch):
    import submitit

    from lmms_quant.weight_cache import WeightCache, cache_key

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the jobs import tests/cluster_jobs.py
    import cluster_jobs

    root, meeting = tmp_path / "cache", tmp_path / "meeting"
    meeting.mkdir()
    key = cache_key("dir:model", "0123456789ab", "synthetic")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "jobs" / "%j"))
    executor.update_parameters(timeout_min=10)
    jobs = [executor.submit(cluster_jobs.build_or_read_cache_entry, str(root), key, str(meeting), me, other)
            for me, other in (("a", "b"), ("b", "a"))]
    results = [job.result() for job in jobs]
    assert sorted(hit for hit, _ in results) == [False, True]  # one built it, the other read it
    assert len(list(meeting.glob("built-by-*"))) == 1
    assert results[0][1] == results[1][1]  # both got the same tensors
    cache = WeightCache(root)
    assert cache.problem(key) is None  # the entry is whole: manifest, sizes and sha256 agree
    assert cache.keys() == [key] and not list(root.glob(".staging-*")) and not list(root.glob(".trash-*"))
