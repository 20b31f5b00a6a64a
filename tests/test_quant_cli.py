"""`lmms-quant quantize`: quantize without evaluating; bad input exits non-zero before anything loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant.cli import main


def test_quantize_writes_the_report(tiny_checkpoints, tmp_path, capsys):
    report = tmp_path / "r.json"
    status = main(["--model", "quant_blip2", "--no_progress", "--report", str(report), "--model_args",
                   f"pretrained={tiny_checkpoints['blip2_opt']},method=rtn,bits=4,component=vit,calib_n=4"])
    assert status == 0
    data = json.loads(report.read_text())
    assert data["n_quantized_tensors"] == 8
    assert {t["component"] for t in data["tensors"]} == {"vit"}
    assert "bpw" in capsys.readouterr().out


def test_save_writes_a_reloadable_quantized_model_with_its_codes(tiny_checkpoints, tmp_path):
    out = tmp_path / "quantized"
    status = main(["--model", "quant_llava", "--no_progress", "--report", str(tmp_path / "r.json"), "--save", str(out),
                   "--model_args", f"pretrained={tiny_checkpoints['llava']},method=gptq,bits=3,group_size=32,"
                                   f"component=connector,calib_n=4"])
    assert status == 0
    assert {"config.json", "model.safetensors", "quant_codes.safetensors", "quant_report.json"} <= {
        p.name for p in out.iterdir()}
    model = FIXTURE_MODEL_CLASSES["llava"].from_pretrained(out)
    original = FIXTURE_MODEL_CLASSES["llava"].from_pretrained(tiny_checkpoints["llava"])
    codes = load_file(str(out / "quant_codes.safetensors"))
    for name in ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"):
        weight = model.get_submodule(name).weight
        assert not torch.equal(weight, original.get_submodule(name).weight)
        key = name.removeprefix("model.")  # the saved model's own state_dict key (transformers renames on save)
        scale = codes[f"{key}.scale"].repeat_interleave(32, dim=1)  # fp32: the simulation's scales exactly
        zero = codes[f"{key}.zero"].float().repeat_interleave(32, dim=1)
        assert torch.equal(weight, (codes[f"{key}.codes"].float() - zero) * scale)
    assert torch.equal(model.get_submodule("lm_head").weight, original.get_submodule("lm_head").weight)
    # An existing, non-empty --save directory is never overwritten.
    assert main(["--model", "quant_llava", "--report", str(tmp_path / "r2.json"), "--save", str(out),
                 "--model_args", f"pretrained={tiny_checkpoints['llava']},method=rtn"]) == 2


@pytest.mark.parametrize("model_args,message", [
    ("pretrained=/no/such/checkpoint,method=rtn,bits=9", "bits=9"),
    ("pretrained=/no/such/checkpoint,method=gptq,layer_type=ffn", "layer_type='ffn'"),
    ("pretrained=/no/such/checkpoint,method=rtn,bitz=4", "unknown key 'bitz'"),
    ("method=rtn,bits=4", "pretrained: missing"),
    ("pretrained=/no/such/checkpoint,method=rtn,dtype=float8", "dtype='float8'"),
])
def test_bad_model_args_exit_non_zero_before_loading(tmp_path, capsys, model_args, message):
    # The checkpoint path does not exist: the message proves the plan was rejected before any load.
    status = main(["--model", "quant_blip2", "--report", str(tmp_path / "r.json"), "--model_args", model_args])
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "valid" in err
    assert not (tmp_path / "r.json").exists()


def test_bad_command_line_exits_non_zero(tmp_path, capsys):
    assert main(["--model", "quant_gpt", "--report", "r.json", "--model_args", "method=rtn"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--model", "quant_blip2", "--model_args", "method=rtn"]) == 2  # no --report
