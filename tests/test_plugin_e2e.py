"""The installed plugin, end to end: plain `lmms-eval` finds our models and runs the stock tasks
(unchanged metrics code) on local data; `lmms-quant eval` adds an honest exit status."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOCAL_TASKS = {
    # task → (metric keys lmms-eval must report, number of docs written by the data fixture)
    "coco2017_cap_val_local": ["coco_CIDEr,none", "coco_Bleu_4,none", "coco_METEOR,none"],
    "flickr30k_test_local": ["flickr_CIDEr,none", "flickr_Bleu_4,none"],
    "vqav2_val_local": ["exact_match,none"],
    "gqa_local": ["exact_match,none"],
}


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _bin(name):
    return str(Path(sys.executable).with_name(name))


def _results_file(out_dir: Path) -> Path:
    # submissions/coco_captions_val2014_alg_results.json also ends in _results.json: look one level down only
    found = sorted(p for p in out_dir.glob("*/*_results.json") if p.parent.name != "submissions")
    assert len(found) == 1, f"expected one results file under {out_dir}, found {found}"
    return found[0]


def test_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert eps.get("lmms_quant") == "lmms_quant.registry:manifests"


def test_entry_point_module_is_import_light():
    # lmms-eval imports the entry point while lmms_eval.models initialises: it must pull in neither
    # torch nor transformers (class paths are strings, imported lazily when a model is requested)
    code = "import sys, lmms_quant.registry as r; r.manifests(); print('RESULT', 'torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "RESULT False False" in out


def test_lmms_eval_resolves_our_model_ids():
    from lmms_eval.models import get_model

    assert get_model("quant_blip2").__name__ == "QuantBlip2"
    assert get_model("quant_llava").__name__ == "QuantLlava"


@pytest.mark.slow
@pytest.mark.parametrize("model,kind", [("quant_blip2", "blip2_opt"), ("quant_llava", "llava")])
def test_lmms_eval_cli_runs_the_four_local_tasks(model, kind, tiny_checkpoints, include_path, tmp_path):
    out = tmp_path / "out"
    cmd = [
        _bin("lmms-eval"), "--model", model,
        "--model_args", f"pretrained={tiny_checkpoints[kind]},dtype=float32",
        "--tasks", ",".join(LOCAL_TASKS), "--include_path", str(include_path),
        "--batch_size", "2", "--log_samples", "--output_path", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results_path = _results_file(out)
    results = json.loads(results_path.read_text())
    assert results["config"]["model"] == model
    for task, metrics in LOCAL_TASKS.items():
        for metric in metrics:
            value = results["results"][task][metric]
            assert isinstance(value, (int, float)) and value == value, (task, metric, value)  # numeric, not NaN
        n_docs = results["n-samples"][task]["effective"]
        samples = list(results_path.parent.glob(f"*_samples_{task}.jsonl"))
        assert len(samples) == 1, samples
        lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
        assert len(lines) == n_docs > 0
        assert all(isinstance(line["filtered_resps"], str) for line in lines)  # the generated answer


def test_wrong_model_arg_key_fails_naming_the_key(tiny_checkpoints, data_root, tmp_path):
    proc = subprocess.run(
        [_bin("lmms-quant"), "eval", "--model", "quant_blip2",
         "--model_args", f"pretrained={tiny_checkpoints['blip2_opt']},bitz=4",
         "--tasks", "vqav2_val_local", "--output_path", str(tmp_path / "out"), "--data-root", str(data_root)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert proc.returncode != 0
    assert "bitz" in proc.stderr
    assert "bits" in proc.stderr  # the valid keys are listed


def test_lmms_quant_eval_exits_nonzero_when_lmms_eval_fails(tmp_path, data_root):
    # a checkpoint directory that does not exist: lmms-eval itself would log the error and exit 0
    proc = subprocess.run(
        [_bin("lmms-quant"), "eval", "--model", "quant_blip2",
         "--model_args", f"pretrained={tmp_path / 'no-such-checkpoint'}",
         "--tasks", "vqav2_val_local", "--output_path", str(tmp_path / "out"),
         "--data-root", str(data_root)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "evaluation failed" in proc.stderr
    assert "no-such-checkpoint" in proc.stderr


def test_tasks_path_renders_absolute_includes_and_data(data_root, tmp_path):
    from lmms_quant.tasks_path import lmms_eval_tasks_dir, local_task_data_files, render_tasks

    rendered = render_tasks(data_root, tmp_path / "tasks")
    files = local_task_data_files(rendered)
    for task in LOCAL_TASKS:
        assert files[task], task
        assert all(p.is_absolute() and p.exists() and p.is_relative_to(data_root) for p in files[task]), files[task]
    text = (rendered / "coco2017_cap_val_local.yaml").read_text()
    assert f"include: {lmms_eval_tasks_dir() / 'coco_cap' / 'coco2017_cap_val.yaml'}" in text


@pytest.mark.slow
def test_quantized_run_through_lmms_eval_writes_the_report_beside_the_results(tiny_checkpoints, include_path, tmp_path):
    out = tmp_path / "out"
    cmd = [
        _bin("lmms-eval"), "--model", "quant_blip2",
        "--model_args", f"pretrained={tiny_checkpoints['blip2_opt']},method=gptq,bits=4,component=vit,calib_n=8",
        "--tasks", "coco2017_cap_val_local", "--include_path", str(include_path), "--output_path", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results_path = _results_file(out)
    assert isinstance(json.loads(results_path.read_text())["results"]["coco2017_cap_val_local"]["coco_CIDEr,none"], float)
    reports = list(results_path.parent.glob("quant_report_*.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    tensors = report["tensors"]
    assert tensors and all(t["component"] == "vit" and t["method"] == "gptq" and t["bits"] == 4 for t in tensors)
    assert {t["name"].split(".")[0] for t in tensors} == {"vision_model"}


def test_the_wheel_puts_everything_under_the_lmms_quant_namespace_with_task_yamls_and_models(tmp_path):
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(repo), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next(tmp_path.glob("lmms_quant-*.whl"))).namelist()
    assert {n.split("/")[0] for n in names} == {"lmms_quant", f"lmms_quant-{_version()}.dist-info"}
    for shipped in ("lmms_quant/model_wrappers/blip2.py", "lmms_quant/tasks/coco2017_cap_val_local.yaml",
                    "lmms_quant/tasks/flickr30k_retrieval_local.yaml", "lmms_quant/assets/tiny_blip2/model.safetensors",
                    "lmms_quant/assets/tiny_blip2_itm/tokenizer.json", "lmms_quant/scripts/train_tiny_vlm.py",
                    "lmms_quant/leaderboard/static/leaderboard.css", "lmms_quant/leaderboard/static/leaderboard.js"):
        assert shipped in names, shipped


def _version():
    import lmms_quant

    return lmms_quant.__version__
