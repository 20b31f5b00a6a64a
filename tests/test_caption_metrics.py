"""lmms-quant's caption aggregations give lmms-eval's caption scores bit for bit, from one tokenization."""

import importlib.util
import json
import os
import random
import shutil
from types import SimpleNamespace

import pytest

from lmms_quant import caption_metrics
from lmms_quant.fixtures.shapes import captions, make_scene

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics run Java")


def _lmms_eval_utils(task_dir: str):
    """lmms-eval's own utils.py of a caption task, loaded as lmms-eval loads it (by file path)."""
    from lmms_quant.tasks_path import lmms_eval_tasks_dir

    path = lmms_eval_tasks_dir() / task_dir / "utils.py"
    spec = importlib.util.spec_from_file_location(f"lmms_eval_{task_dir}_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(n: int = 12) -> list[dict]:
    """Per-doc records as lmms-eval's process_results makes them: right, partly right, wrong and
    empty predictions, punctuation and capitals, so that every metric has something to score."""
    rng = random.Random(7)
    scenes = [make_scene(rng) for _ in range(n)]
    preds = []
    for i, scene in enumerate(scenes):
        refs = captions(scene)
        kind = i % 4
        if kind == 0:
            preds.append(refs[0])
        elif kind == 1:
            preds.append(refs[0].split(" ", 2)[-1].upper() + ", really!")
        elif kind == 2:
            preds.append(captions(scenes[(i + 1) % n])[0])
        else:
            preds.append("a shape" if i % 8 == 3 else "")
    return [{"answer": captions(scene), "pred": pred, "image_id": 1000 + i, "id": i}
            for i, (scene, pred) in enumerate(zip(scenes, preds))]


METRIC_FUNCTIONS = ("bleu4", "bleu3", "bleu2", "bleu1", "meteor", "rougel", "cider")


@pytest.mark.slow
@pytest.mark.parametrize("task_dir,prefix", [("coco_cap", "coco"), ("flickr30k", "flickr")])
def test_every_caption_metric_equals_lmms_evals_own_aggregation_bit_for_bit_from_one_tokenization(
        tmp_path, monkeypatch, task_dir, prefix):
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    results = _results()
    java_launches = []
    tokenize, meteor_init = PTBTokenizer.tokenize, Meteor.__init__
    monkeypatch.setattr(PTBTokenizer, "tokenize", lambda self, c: java_launches.append("ptb") or tokenize(self, c))
    monkeypatch.setattr(Meteor, "__init__", lambda self: java_launches.append("meteor") or meteor_init(self))
    caption_metrics._MEMO.clear()
    ours_args = SimpleNamespace(output_path=str(tmp_path / "ours"))
    ours = {name: getattr(caption_metrics, f"{prefix}_{name}")([dict(r) for r in results], args=ours_args)
            for name in METRIC_FUNCTIONS}
    # lmms-eval launches 3 JVMs per metric (two tokenizations, one METEOR); here 3 for all seven.
    assert sorted(java_launches) == ["meteor", "ptb", "ptb"]

    theirs_utils = _lmms_eval_utils(task_dir)
    theirs_args = SimpleNamespace(output_path=str(tmp_path / "theirs"))
    for name in METRIC_FUNCTIONS:
        theirs = getattr(theirs_utils, f"{prefix}_{name}")([dict(r) for r in results], args=theirs_args)
        assert type(ours[name]) is type(theirs) and ours[name] == theirs, (name, ours[name], theirs)
    assert 0 < ours["cider"] < 10 and 0 < ours["meteor"] < 1
    # The predictions file(s) lmms-eval writes beside the results: same names, same contents.
    ours_files = sorted(p.name for p in (tmp_path / "ours" / "submissions").iterdir())
    theirs_files = sorted(p.name for p in (tmp_path / "theirs" / "submissions").iterdir())
    assert ours_files == theirs_files
    for name in ours_files:
        assert (json.loads((tmp_path / "ours" / "submissions" / name).read_text())
                == json.loads((tmp_path / "theirs" / "submissions" / name).read_text()))


def test_other_results_are_scored_anew_not_served_from_the_memo():
    changed = _results()
    changed[0]["pred"] = "something else"
    assert caption_metrics._digest(changed) != caption_metrics._digest(_results())
    assert caption_metrics._digest([dict(r) for r in _results()]) == caption_metrics._digest(_results())


@pytest.mark.parametrize("ours,theirs", [("coco2017_cap_val_local.yaml", "coco_cap/coco2017_cap_val.yaml"),
                                         ("flickr30k_test_local.yaml", "flickr30k/flickr30k_test.yaml")])
def test_local_caption_tasks_keep_lmms_evals_metric_names_with_these_aggregations(ours, theirs):
    import yaml

    from lmms_quant.tasks_path import _TaskLoader, lmms_eval_tasks_dir, shipped_tasks_dir

    def metric_list(path):
        return yaml.load(path.read_text(), Loader=_TaskLoader)["metric_list"]

    mine, stock = metric_list(shipped_tasks_dir() / ours), metric_list(lmms_eval_tasks_dir() / theirs)
    assert [(m["metric"], m["higher_is_better"]) for m in mine] == [(m["metric"], m["higher_is_better"]) for m in stock]
    for entry in mine:
        module, name = str(entry["aggregation"]).rsplit(".", 1)
        assert module == "lmms_quant.caption_metrics" and callable(getattr(caption_metrics, name))
        stock_function = next(m["aggregation"] for m in stock if m["metric"] == entry["metric"])
        assert name == str(stock_function).rsplit(".", 1)[1]  # same name as lmms-eval's: coco_bleu4 ...


def _in_fork(function) -> str:
    """function() run in a forked child; what it returned (a str), or the child's traceback."""
    import traceback

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        try:
            os.close(read)
            try:
                text = function()
            except BaseException:  # noqa: BLE001 - reported to the parent
                text = "ERROR " + traceback.format_exc()
            os.write(write, text.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    assert not text.startswith("ERROR"), text
    return text


@pytest.mark.slow
def test_forked_evaluations_share_one_meteor_process_that_scores_as_a_fresh_one_until_an_exchange_is_cut_off(
        monkeypatch):
    from pycocoevalcap.meteor.meteor import Meteor

    first, second = _results(), _results(8)
    second[0]["pred"] = "a green square"
    caption_metrics._MEMO.clear()
    fresh = [caption_metrics.caption_scores(r)["METEOR"] for r in (first, second)]  # a fresh JVM each
    meteor_starts = []
    meteor_init = Meteor.__init__
    monkeypatch.setattr(Meteor, "__init__", lambda self: meteor_starts.append(1) or meteor_init(self))
    monkeypatch.setattr(caption_metrics, "_SHARED_METEOR", None)
    caption_metrics.share_meteor()
    shared = caption_metrics._SHARED_METEOR
    process = shared.meteor.meteor_p
    try:
        assert len(meteor_starts) == 1

        def score(results):  # in a fork, like a configuration of the demo: memo empty, count JVM starts
            caption_metrics._MEMO.clear()
            meteor_starts.clear()
            return json.dumps([caption_metrics.caption_scores(results)["METEOR"], len(meteor_starts)])

        for results, expected in ((first, fresh[0]), (second, fresh[1]), (first, fresh[0])):
            assert json.loads(_in_fork(lambda: score(results))) == [expected, 0]  # no JVM started

        def cut_off():  # an evaluation killed half-way through its exchange
            with shared.exchange() as meteor:
                meteor.meteor_p.stdin.write(b"SCORE ||| a red circle ||| a red circle\n")
                meteor.meteor_p.stdin.flush()
                os._exit(1)

        _in_fork(cut_off)
        assert json.loads(_in_fork(lambda: score(second))) == [fresh[1], 1]  # a private METEOR, right score
        assert process.poll() is None  # no fork stopped the shared process
    finally:
        caption_metrics.stop_shared_meteor()
    assert process.poll() is not None and not os.path.exists(shared.state_path)  # its creator did
