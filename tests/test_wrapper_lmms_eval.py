"""``quant``: lmms-eval's own model classes, built through lmms-eval's registry, quantized in place.

In process, on the tiny LLaVA fixture through lmms-eval's ``llava_hf`` (its chat class), with the
requests lmms-eval's own chat task class builds. lmms-eval's classes pick CUDA by default, so
every test passes ``device=cpu,device_map=cpu`` as their own arguments.
"""

import functools
import json
from pathlib import Path

import pytest
import torch

TASKS = ("vqav2_val_local", "gqa_local")
DOCS_PER_TASK = 2
CPU = "device=cpu,device_map=cpu"


@pytest.fixture(scope="module")
def tasks(include_path):
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config

    built = {}
    for name in TASKS:
        task = ConfigurableMessagesTask(config=load_yaml_config(str(Path(include_path) / f"{name}.yaml"), mode="full"),
                                        model_name="quant")
        task.build_all_requests(limit=DOCS_PER_TASK, rank=0, world_size=1)
        built[name] = task
    return built


def all_requests(tasks):
    return [instance for task in tasks.values() for instance in task.instances]


def build(arg_string, tasks=None):
    from lmms_eval.models import get_model

    lm = get_model("quant").create_from_arg_string(arg_string, {"batch_size": "1", "max_batch_size": None, "device": None})
    for name, task in (tasks or {}).items():
        lm.task_dict[name] = task.dataset
    return lm


@pytest.fixture
def recorded_init(monkeypatch):
    """The kwargs lmms-eval's LlavaHf.__init__ receives (it then runs as usual)."""
    from lmms_eval.models.simple.llava_hf import LlavaHf

    seen = []
    real_init = LlavaHf.__init__

    @functools.wraps(real_init)  # the same signature, which is what `quant` reads
    def recording_init(self, **kwargs):
        seen.append(dict(kwargs))
        real_init(self, **kwargs)

    monkeypatch.setattr(LlavaHf, "__init__", recording_init)
    return seen


def test_quant_resolves_as_a_chat_model_and_takes_the_wrapped_class_request_format():
    from lmms_eval.models import get_model

    from lmms_quant.model_wrappers.lmms_eval_model import QuantLmmsEval, lmms_eval_class

    assert get_model("quant") is QuantLmmsEval
    # lmms-eval's own registry, its own classes: simple and chat ones
    assert lmms_eval_class("llava_hf") is get_model("llava_hf") and get_model("llava_hf").is_simple is False
    assert lmms_eval_class("instructblip").__module__ == "lmms_eval.models.simple.instructblip"
    assert lmms_eval_class("instructblip").is_simple is True


def test_plan_keys_never_reach_lmms_evals_class(tiny_checkpoints, recorded_init, tmp_path):
    ckpt = tiny_checkpoints["llava"]
    lm = build(f"model=llava_hf,pretrained={ckpt},{CPU},method=gptq,bits=4,component=vit,calib_n=4,"
               f"report_dir={tmp_path},dtype=float32")
    # LlavaHf asserts kwargs == {} itself; this is what it got: its own parameters and lmms-eval's batch_size
    assert recorded_init == [{"pretrained": str(ckpt), "device": "cpu", "device_map": "cpu", "dtype": "float32",
                              "batch_size": "1"}]
    assert lm.recipe.method == "gptq" and lm.args.report_dir == str(tmp_path)
    assert type(lm.lm).__module__ == "lmms_eval.models.chat.llava_hf"


@pytest.mark.parametrize("arg_string,match", [
    ("model=llava_hf,pretrained={ckpt},bitz=4", r"unknown key 'bitz' \(value 4\) \(did you mean 'bits'\?\).*"
                                                r"lmms-eval's llava_hf \(LlavaHf\) parameters .*max_frames_num"),
    ("model=llava_hf,pretrained={ckpt},max_frame_num=4", r"unknown key 'max_frame_num'.*did you mean 'max_frames_num'"),
    ("pretrained={ckpt},bits=4", r"model: missing; valid: an lmms-eval model id"),
    ("model=no_such_model,pretrained={ckpt}", r"model: got 'no_such_model'; valid: an lmms-eval model id: .*qwen2_5_vl"),
    ("model=quant_llava,pretrained={ckpt}", r"model: got 'quant_llava', an lmms-quant model"),
    ("model=llava_hf,pretrained={ckpt},method=gptq,bits=9", r"bits"),
])
def test_bad_model_args_fail_naming_the_key_before_anything_is_built(arg_string, match, tmp_path, recorded_init):
    with pytest.raises(ValueError, match=match):
        build(arg_string.format(ckpt=tmp_path / "absent"))
    assert recorded_init == []  # lmms-eval's class was never constructed


def test_a_plan_key_that_is_also_the_wrapped_class_parameter_is_refused():
    from lmms_eval.api.model import lmms

    from lmms_quant.model_wrappers.lmms_eval_model import split_model_args

    class TakesSeed(lmms):
        def __init__(self, pretrained="x", seed=0, batch_size=1):
            super().__init__()

    own, plan, inner = split_model_args({"model": "m", "pretrained": "p", "bits": 4, "report_dir": "r", "batch_size": 2,
                                         "max_batch_size": None}, TakesSeed, "m")
    assert own == {"model": "m", "report_dir": "r"} and plan == {"bits": 4}
    assert inner == {"pretrained": "p", "batch_size": 2}  # max_batch_size: lmms-eval's, not taken by the class
    with pytest.raises(ValueError, match=r"seed: got 1, but 'seed' is both an lmms-quant quantization key and a parameter"):
        split_model_args({"seed": 1}, TakesSeed, "m")


def test_requests_are_delegated_after_quantizing_once(tiny_checkpoints, tasks, tmp_path, monkeypatch):
    lm = build(f"model=llava_hf,pretrained={tiny_checkpoints['llava']},{CPU},method=rtn,bits=8,report_dir={tmp_path}", tasks)
    log = []
    monkeypatch.setattr(lm, "ensure_quantized", lambda requests: log.append(("quantize", len(requests))))
    for method in ("generate_until", "loglikelihood", "generate_until_multi_round"):
        monkeypatch.setattr(lm.lm, method, lambda requests, m=method: log.append((m, len(requests))) or [m] * len(requests))
    requests = all_requests(tasks)
    assert lm.generate_until(requests) == ["generate_until"] * len(requests)
    assert lm.loglikelihood(requests[:1]) == ["loglikelihood"]
    assert lm.generate_until_multi_round(requests[:1]) == ["generate_until_multi_round"]
    assert log == [("quantize", 4), ("generate_until", 4), ("quantize", 1), ("loglikelihood", 1),
                   ("quantize", 1), ("generate_until_multi_round", 1)]
    # what lmms-eval reads or fills on the model is the wrapped object's
    assert lm.task_dict is lm.lm.task_dict and set(lm.task_dict) == set(TASKS)
    assert lm.batch_size == lm.lm.batch_size and lm.device == lm.lm.device and lm.is_simple is lm.lm.is_simple


def test_the_model_inside_lmms_evals_object_is_quantized_and_reported(tiny_checkpoints, tasks, tmp_path):
    ckpt = tiny_checkpoints["llava"]
    fp = build(f"model=llava_hf,pretrained={ckpt},{CPU}", tasks)
    fp_state = {n: t.clone() for n, t in fp.lm.model.state_dict().items()}
    fp_answers = [r.text for r in fp.generate_until(all_requests(tasks))]
    assert fp.quant_report is None  # method=fp16: nothing quantized, nothing written
    assert not list(tmp_path.rglob("quant_report_*.json"))

    lm = build(f"model=llava_hf,pretrained={ckpt},{CPU},method=gptq,bits=2,component=llm,calib_n=4,"
               f"report_dir={tmp_path}", tasks)
    assert lm.hf_model is lm.lm.model and lm.processor is lm.lm._image_processor
    answers = lm.generate_until(all_requests(tasks))
    state = lm.lm.model.state_dict()
    changed = {n for n, t in state.items() if not torch.equal(t, fp_state[n])}
    report = json.loads(lm.report_path().read_text())
    assert changed == {f"{t['name']}.weight" for t in report["tensors"]}
    assert report["tensors"] and {t["component"] for t in report["tensors"]} == {"llm"}
    assert all(t["bits"] == 2 and t["method"] == "gptq" for t in report["tensors"])
    assert lm.report_path().parent.name == f"{Path(ckpt).parent.name}__{Path(ckpt).name}"
    assert len(answers) == len(fp_answers) and all(isinstance(a.text, str) for a in answers)


def test_canonical_model_args_spell_out_the_plan_for_lmms_quant_eval(tmp_path):
    from lmms_eval.utils import simple_parse_args_string

    import lmms_quant
    from lmms_quant.model_wrappers.lmms_eval_model import QuantLmmsEval

    canonical = QuantLmmsEval.canonical_model_args(f"model=llava_hf,pretrained={tmp_path},{CPU},method=awq")
    parsed = simple_parse_args_string(canonical)
    assert canonical.startswith(f"model=llava_hf,pretrained={tmp_path},device=cpu,device_map=cpu,")
    assert parsed["lmms_quant_version"] == lmms_quant.__version__ and parsed["llm_bits"] == 4 and parsed["calib"] == "synthetic"
    assert QuantLmmsEval.canonical_model_args(canonical) == canonical
    with pytest.raises(ValueError, match="batch_size"):
        QuantLmmsEval.canonical_model_args(f"model=llava_hf,pretrained={tmp_path},batch_size=2")


def test_an_object_without_one_hf_model_and_processor_fails_naming_what_it_holds():
    from lmms_quant.model_wrappers.lmms_eval_model import find_hf_parts

    class ApiModel:
        def __init__(self):
            self.client = object()
            self._tokenizer = "a tokenizer"
            self.head = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"holds 0 transformers PreTrainedModel.*Found: _tokenizer: str, head: Linear"):
        find_hf_parts(ApiModel())
