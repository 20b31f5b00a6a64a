"""lmms-eval's COCO and Flickr30k caption metrics, computed once per task instead of once per metric.

lmms-eval 0.7.3 scores a caption task with seven aggregation functions (BLEU-1..4, METEOR, ROUGE-L,
CIDEr), and each one calls its task's ``*_aggregation_result``: that call builds a COCO index of the
references, tokenizes references and predictions with two fresh Stanford PTB tokenizer JVMs, and
constructs every scorer, METEOR included, whose constructor starts a third JVM that loads its
paraphrase tables even when the call scores BLEU. That is 21 Java launches per caption task and
evaluation, most of the time a tiny model's evaluation takes.

The functions here are what lmms-quant's ``*_local`` caption tasks name as their aggregations. They
do the same computation -- the same COCO index, the same PTB tokenization of references and of
predictions (two calls, as lmms-eval makes them), the same pycocoevalcap scorers on the same inputs --
once for a given set of results, and return each metric from it (3 Java launches). The scores are
lmms-eval's, bit for bit: ``tests/test_caption_metrics.py`` compares every metric with lmms-eval's
own aggregation functions. The submission files lmms-eval writes beside the results are written too.

A process that forks evaluations (`lmms-quant demo`) can also start one METEOR process for all of
them (`share_meteor`): METEOR's start, not its scoring, is what costs (~9 CPU-seconds loading its
paraphrase tables), and its ``-stdio`` protocol keeps no state between exchanges, so a long-lived
process scores exactly as a fresh one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections import OrderedDict

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# Results of the last few tasks scored in this process, keyed by a digest of their contents: the
# seven aggregation calls of one task get seven lists with the same records.
_MEMO: OrderedDict[str, tuple[dict[str, float], list[dict]]] = OrderedDict()
_MEMO_SIZE = 4


def _digest(results: list[dict]) -> str:
    records = [(r["image_id"], r["pred"], list(r["answer"])) for r in results]
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def _references_and_predictions(results: list[dict]):
    """(gts, res, submission) as lmms-eval builds them: a COCO index of the references, the
    predictions loaded as its results (``loadRes`` numbers them in place, and lmms-eval writes them so
    numbered), and per image id the reference and prediction annotations."""
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    submission = [{"image_id": int(r["image_id"]), "caption": r["pred"]} for r in results]
    dataset = {"annotations": [], "images": []}
    idx = 0
    for result in results:
        for answer in result["answer"]:
            dataset["annotations"].append({"image_id": int(result["image_id"]), "caption": answer, "id": idx})
            idx += 1
        dataset["images"].append({"id": int(result["image_id"])})
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    evaluation = COCOEvalCap(coco, coco.loadRes(submission))
    ids = evaluation.params["image_id"]
    gts = {i: evaluation.coco.imgToAnns[i] for i in ids}
    res = {i: evaluation.cocoRes.imgToAnns[i] for i in ids}
    return gts, res, submission


def _owned_meteor(owner: int):
    """pycocoevalcap's Meteor, stopped only by the process ``owner`` (forks inherit the object)."""
    from pycocoevalcap.meteor.meteor import Meteor

    class OwnedMeteor(Meteor):
        def __del__(self):  # Meteor's own takes its lock, which a failed exchange leaves held
            if os.getpid() == owner and self.meteor_p.poll() is None:
                with contextlib.suppress(OSError):
                    self.meteor_p.stdin.close()
                self.meteor_p.kill()
                self.meteor_p.wait()

    return OwnedMeteor()


class SharedMeteor:
    """One METEOR process for this process and the evaluations it forks, one exchange at a time.

    A user takes it under an exclusive lock on a state file that says ``ready``; the file says
    ``busy`` while an exchange is under way and goes back to ``ready`` only when it has completed. An
    exchange cut off half-way (an evaluation killed, a METEOR error) leaves ``busy``, and every later
    user scores with a private METEOR process: a reply meant for someone else is never read."""

    READY, BUSY = b"ready", b"busy"

    def __init__(self):
        self.owner = os.getpid()
        handle, self.state_path = tempfile.mkstemp(prefix="lmms-quant-meteor-", suffix=".state")
        os.write(handle, self.READY)
        os.close(handle)
        self.meteor = _owned_meteor(self.owner)  # the JVM starts loading now, in the background
        atexit.register(self.close)

    def close(self) -> None:
        if os.getpid() == self.owner and self.meteor is not None:
            self.meteor = None  # stops the process
            with contextlib.suppress(OSError):
                os.unlink(self.state_path)

    @contextlib.contextmanager
    def exchange(self):
        """The shared METEOR, or None when an earlier exchange did not complete."""
        with open(self.state_path, "r+b") as state:
            fcntl.flock(state, fcntl.LOCK_EX)
            if self.meteor is None or state.read() != self.READY:
                yield None
                return
            os.pwrite(state.fileno(), self.BUSY.ljust(len(self.READY)), 0)
            yield self.meteor  # an exception here leaves "busy": nobody trusts this process again
            os.pwrite(state.fileno(), self.READY, 0)


_SHARED_METEOR: SharedMeteor | None = None


def share_meteor() -> None:
    """Start the METEOR process that this process and its forks will score with (see `SharedMeteor`)."""
    global _SHARED_METEOR
    if _SHARED_METEOR is None:
        _SHARED_METEOR = SharedMeteor()


def stop_shared_meteor() -> None:
    """Stop the shared METEOR process (its JVM holds ~1 GB); later scoring starts private ones."""
    global _SHARED_METEOR
    if _SHARED_METEOR is not None:
        _SHARED_METEOR.close()
        _SHARED_METEOR = None


def _meteor(gts, res) -> float:
    from loguru import logger
    from pycocoevalcap.meteor.meteor import Meteor

    if _SHARED_METEOR is not None:
        try:
            with _SHARED_METEOR.exchange() as meteor:
                if meteor is not None:
                    return meteor.compute_score(gts, res)[0]
        except (OSError, ValueError) as err:  # the shared process died or answered nonsense
            logger.warning(f"lmms-quant caption metrics: the shared METEOR process failed ({err}); "
                           f"scoring with a private one")
    meteor = Meteor()  # its JVM lives as long as the object: dropped right after use
    score = meteor.compute_score(gts, res)[0]
    del meteor
    return score


def _evaluate(results: list[dict]) -> tuple[dict[str, float], list[dict]]:
    key = _digest(results)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    from loguru import logger
    from pycocoevalcap.eval import Bleu, Cider, Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts, res, submission = _references_and_predictions(results)
    logger.info("lmms-quant caption metrics: tokenization (once for all seven metrics)...")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts)
    res = tokenizer.tokenize(res)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for n in range(1, 5):
        scores[f"Bleu_{n}"] = bleu[n - 1]
    scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    logger.info("lmms-quant caption metrics: " + ", ".join(f"{m} {scores[m]:.4f}" for m in METRICS))
    _MEMO[key] = scores, submission
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return scores, submission


def caption_scores(results: list[dict]) -> dict[str, float]:
    """Every caption metric of ``results`` (lmms-eval's per-doc records: answer, pred, image_id), once."""
    return dict(_evaluate(results)[0])


def _aggregate(results, metric: str, args, file_name: str, *, overwrite: bool) -> float:
    """One metric, and the predictions file lmms-eval's aggregation writes under <output_path>/submissions/."""
    from pathlib import Path

    from lmms_eval.tasks._task_utils.file_utils import generate_submission_file

    from lmms_quant.atomic import write_text_atomic

    scores, submission = _evaluate(results)
    path = Path(generate_submission_file(file_name, args))
    if overwrite or not path.exists():
        write_text_atomic(path, json.dumps(submission, indent=4))
    return scores[metric]


def _coco(results, metric: str, args) -> float:
    # lmms-eval's COCO aggregation writes its submission file once, at the first metric.
    return _aggregate(results, metric, args, "coco_captions_val2014_alg_results.json", overwrite=False)


def _flickr(results, metric: str, args) -> float:
    # lmms-eval's Flickr30k aggregation writes one per metric.
    return _aggregate(results, metric, args, f"flickr30k_captions_val2014_alg_results_{metric}.json", overwrite=True)


# The aggregation functions the task YAMLs name (same names and signatures as lmms-eval's).
def coco_bleu4(results, args=None):
    return _coco(results, "Bleu_4", args)


def coco_bleu3(results, args=None):
    return _coco(results, "Bleu_3", args)


def coco_bleu2(results, args=None):
    return _coco(results, "Bleu_2", args)


def coco_bleu1(results, args=None):
    return _coco(results, "Bleu_1", args)


def coco_meteor(results, args=None):
    return _coco(results, "METEOR", args)


def coco_rougel(results, args=None):
    return _coco(results, "ROUGE_L", args)


def coco_cider(results, args=None):
    return _coco(results, "CIDEr", args)



def flickr_bleu4(results, args=None):
    return _flickr(results, "Bleu_4", args)


def flickr_bleu3(results, args=None):
    return _flickr(results, "Bleu_3", args)


def flickr_bleu2(results, args=None):
    return _flickr(results, "Bleu_2", args)


def flickr_bleu1(results, args=None):
    return _flickr(results, "Bleu_1", args)


def flickr_meteor(results, args=None):
    return _flickr(results, "METEOR", args)


def flickr_rougel(results, args=None):
    return _flickr(results, "ROUGE_L", args)


def flickr_cider(results, args=None):
    return _flickr(results, "CIDEr", args)

