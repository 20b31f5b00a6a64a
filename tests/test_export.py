"""Packed export: a compressed-tensors checkpoint that transformers loads back, in a fresh process,
to the simulated model bit for bit (weights and held-out logits), for RTN, GPTQ and AWQ and for
every component; what the format cannot hold is refused with the reason."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant import Recipe, quantize
from lmms_quant.quant.calibration import load_samples, make_batches
from lmms_quant.quant.export import ExportError, export_run
from lmms_quant.quant.recipe import CalibSource
from lmms_quant.quant.saved import checkpoint_names

# (case id, fixture, plan, dtype): every method, every component, each grid the format holds.
CASES = [
    ("rtn-vit-bf16", "blip2_opt", "method=rtn,bits=4,group_size=32,component=vit", torch.bfloat16),
    ("gptq-connector-channel-actorder", "blip2_opt",
     "method=gptq,bits=3,group_size=-1,sym=true,act_order=true,component=connector", None),
    ("awq-llm", "blip2_opt", "method=awq,bits=4,group_size=32,component=llm", None),
    ("rtn-connector-tensor-asym", "llava", "method=rtn,bits=8,granularity=tensor,component=connector", None),
    ("gptq-llm-saved-run", "llava", "method=gptq,bits=2,group_size=32,act_order=true,component=llm", None),
    ("awq-vit-sym", "llava", "method=awq,bits=4,group_size=32,sym=true,component=vit", None),
    ("gptq-mixed-vit8-llm3", "llava",
     "method=gptq,vit_bits=8,connector_bits=16,llm_bits=3,group_size=32,sym=true,component=all", None),
]

CHILD = r"""
import json, sys, torch
from lmms_quant.quant.export import load_exported
results = {}
for case, export_dir, expected in json.loads(sys.argv[1]):
    want = torch.load(expected)
    model = load_exported(export_dir)
    state = model.state_dict()
    differ = sorted(k for k in want["state"] if k not in state or not torch.equal(state[k], want["state"][k]))
    with torch.no_grad():
        logits_equal = all(torch.equal(model(**inputs).logits, logits) for inputs, logits in want["heldout"])
    results[case] = {"extra_keys": sorted(set(state) - set(want["state"])), "differ": differ,
                     "logits_equal": logits_equal, "class": type(model).__name__}
print(json.dumps(results))
"""


def _args(text: str) -> dict:
    return dict(item.split("=", 1) for item in text.split(","))


def _heldout(model, processor, style):
    samples = load_samples(CalibSource("synthetic"), 4, seed=777)  # a seed the calibration never draws
    pairs = []
    with torch.no_grad():
        for batch in make_batches(processor, style, samples, 2):
            inputs = batch.to("cpu", model.dtype)
            pairs.append((inputs, model(**inputs).logits))
    return pairs


def _quantize_in_memory(checkpoint, kind, plan_text, dtype, export_dir):
    model_class = FIXTURE_MODEL_CLASSES[kind]
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = model_class.from_pretrained(checkpoint, dtype=dtype or torch.float32).eval()
    report = quantize(model, processor, Recipe.parse({**_args(plan_text), "calib_n": "8"}), keep_codes=True,
                      progress=False)
    expected = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                "heldout": _heldout(model, processor, report.calibration["prompt_style"])}
    names = checkpoint_names(model, report.codes)
    export_run(model, processor, report, export_dir)
    return expected, names


def _quantize_saved_run(checkpoint, kind, plan_text, tmp_path, export_dir):
    """Through the commands: `quantize --save S --export D`, then `export S D2` (the same bytes)."""
    from transformers import AutoProcessor

    from lmms_quant.cli import main as lmms_quant

    saved = tmp_path / "saved"
    assert lmms_quant(["quantize", "--model", "quant_llava", "--no_progress", "--report", str(tmp_path / "r.json"),
                       "--save", str(saved), "--export", str(export_dir), "--model_args",
                       f"pretrained={checkpoint},{plan_text},calib_n=8"]) == 0
    assert lmms_quant(["export", str(saved), str(tmp_path / "again")]) == 0
    assert (export_dir / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "r.json").read_text())["export"]["dir"] == str(export_dir.resolve())

    model = FIXTURE_MODEL_CLASSES[kind].from_pretrained(saved).eval()
    report = json.loads((saved / "quant_report.json").read_text())
    names = checkpoint_names(model, [t["name"] for t in report["tensors"]])
    # One naming: the codes file uses the saved model's own state_dict keys (LLaVA: language_model.model.*).
    with safe_open(str(saved / "quant_codes.safetensors"), "pt") as codes, \
            safe_open(str(saved / "model.safetensors"), "pt") as weights:
        saved_keys = set(weights.keys())
        assert {k.rsplit(".", 1)[0] for k in codes.keys()} == set(names.values())
    assert all(f"{saved_name}.weight" in saved_keys for saved_name in names.values())
    assert any(name != saved_name for name, saved_name in names.items())  # the renaming is exercised
    processor = AutoProcessor.from_pretrained(saved)
    expected = {"state": model.state_dict(), "heldout": _heldout(model, processor, report["calibration"]["prompt_style"])}
    return expected, names


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    """Every case quantized and exported here; all loaded back in ONE fresh process."""
    cases, jobs = {}, []
    for case, kind, plan_text, dtype in CASES:
        root = tmp_path_factory.mktemp(case)
        export_dir = root / "packed"
        if case.endswith("saved-run"):
            expected, names = _quantize_saved_run(tiny_checkpoints[kind], kind, plan_text, root, export_dir)
        else:
            expected, names = _quantize_in_memory(tiny_checkpoints[kind], kind, plan_text, dtype, export_dir)
        torch.save(expected, root / "expected.pt")
        cases[case] = {"dir": export_dir, "names": names, "plan": _args(plan_text), "kind": kind}
        jobs.append((case, str(export_dir), str(root / "expected.pt")))
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    return {case: {**info, "reload": results[case]} for case, info in cases.items()}


def _matches(target: str, name: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_exported_checkpoint_reloads_to_the_simulated_model_bit_for_bit(exported, case):
    info = exported[case]
    reload = info["reload"]
    assert reload["class"] == FIXTURE_MODEL_CLASSES[info["kind"]].__name__
    assert reload["differ"] == [] and reload["extra_keys"] == []
    assert reload["logits_equal"]

    export_dir, names = info["dir"], info["names"]
    qconfig = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["quantization_status"] == "compressed"
    # The config groups name exactly the quantized Linears (in memory and in the file), at their grids.
    report = json.loads((export_dir / "quant_report.json").read_text())
    grids = {t["name"]: t for t in report["tensors"]}
    assert set(grids) == set(names)
    seen = set()
    for group in qconfig["config_groups"].values():
        weights = group["weights"]
        for target in group["targets"]:
            matched = [n for n in names if _matches(target, n)]
            assert len(matched) == 1 and _matches(target, names[matched[0]]), target
            record = grids[matched[0]]
            assert weights["num_bits"] == record["bits"] and weights["symmetric"] == record["sym"]
            assert weights["strategy"] == record["granularity"]
            assert weights.get("group_size") == (record["group_size"] if record["granularity"] == "group" else None)
            act_order = report["plan"].get("act_order") == "true"  # as resolved (GPTQ's default is true)
            assert weights.get("actorder") == ("weight" if act_order else None)
            seen.update(matched)
    assert seen == set(names)
    expected_groups = len({(t["bits"], t["sym"], t["granularity"]) for t in grids.values()})
    assert len(qconfig["config_groups"]) == expected_groups
    assert expected_groups == (2 if "mixed" in case else 1)
    # Everything else is ignored, and the file holds packed integers, not dense weights, for the quantized.
    with safe_open(str(export_dir / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        packed = {n: handle.get_tensor(f"{names[n]}.weight_packed") for n in names}
    assert set(qconfig["ignore"]).isdisjoint(names.values()) and "language_model.lm_head" in qconfig["ignore"]
    for name, saved_name in names.items():
        assert packed[name].dtype == torch.int32 and f"{saved_name}.weight" not in keys
        assert (f"{saved_name}.weight_zero_point" in keys) == (not grids[name]["sym"])
    # The real figures, under the key the leaderboard reads.
    record = report["export"]
    assert record["format"] == "compressed-tensors" and record["dir"] == str(export_dir.resolve())
    assert record["file_bytes"] == (export_dir / "model.safetensors").stat().st_size
    assert record["loaded_memory_bytes"] is None and record["device"] == "cpu"


def _rtn_run(tiny_checkpoints, plan_text):
    from transformers import Blip2Processor

    path = tiny_checkpoints["blip2_opt"]
    model = FIXTURE_MODEL_CLASSES["blip2_opt"].from_pretrained(path).eval()
    processor = Blip2Processor.from_pretrained(path)
    return model, processor, quantize(model, processor, Recipe.parse({**_args(plan_text), "calib_n": "4"}),
                                      keep_codes=True, progress=False)


@pytest.mark.parametrize("plan_text,message", [
    ("method=rtn,bits=4,group_size=48,component=vit",
     "group_size=48 does not divide in_features=64 (the last group of each row is 16 wide)"),
    ("method=rtn,bits=4,group_size=32,component=llm,include=lm_head",
     "language_model.lm_head.weight is tied to language_model.model.decoder.embed_tokens.weight"),
])
def test_what_the_format_cannot_hold_is_refused_with_the_reason(tiny_checkpoints, tmp_path, plan_text, message):
    model, processor, report = _rtn_run(tiny_checkpoints, plan_text)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError) as err:
        export_run(model, processor, report, tmp_path / "packed")
    assert message in str(err.value)
    assert not (tmp_path / "packed").exists()
    state = model.state_dict()
    assert set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)  # untouched


def test_export_commands_refuse_bad_directories_before_loading(tiny_checkpoints, tmp_path, capsys):
    from lmms_quant.cli import main as lmms_quant

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert lmms_quant(["quantize", "--model", "quant_blip2", "--report", str(tmp_path / "r.json"), "--export",
                       str(taken), "--model_args", "pretrained=/no/such/checkpoint,method=rtn"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert lmms_quant(["export", str(tiny_checkpoints["blip2_opt"]), str(tmp_path / "out")]) == 2
    assert "quant_codes.safetensors is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
