"""Test double of the `lmms-quant eval` subprocess: writes lmms-eval's output layout in a fraction of a second.

Used by the sweep and leaderboard tests as ``--eval-command "<python> tests/fake_eval_output.py"``, so
that kill/resume and the leaderboard can be tested on many configurations without running models.
What it writes follows lmms-eval 0.7.3 (notes/lmms-eval.md §6) and the model wrappers:

    <output_path>/<model_name_sanitized>/<YYYYmmdd_HHMMSS>_results.json
    <output_path>/<model_name_sanitized>/<YYYYmmdd_HHMMSS>_samples_<task>.jsonl   (--log_samples)
    <output_path>/<model_name_sanitized>/quant_report_<plan digest>.json          (quantized plans)

Scores are a deterministic function of the plan and the document (fewer bits -> lower scores), so two
runs of one configuration give identical files apart from the timestamp in their names. What is logged
per document is what the real tasks log: a VQA score; for captions the scorer's inputs (prediction and
references, already in PTB-tokenized form: lower case, no punctuation) with the corpus scores computed
by pycocoevalcap's own scorers; for retrieval a rank record (docs/retrieval.md) and R@K over them.

Environment knobs (test instrumentation, not behaviour under test):
    FAKE_EVAL_LOG      append a JSON line when an invocation starts and when it finishes (event, pid,
                       output_path, model_args, CUDA_VISIBLE_DEVICES, time)
    FAKE_EVAL_SLEEP    seconds to sleep after the samples are written and before the results (the window
                       in which a test kills the sweep: the run directory then holds partial output)
    FAKE_EVAL_SLEEP_ON only sleep (and wait, below) when model_args contains this substring
    FAKE_EVAL_WAIT_FOR a path: after the samples are written, wait until it exists (a gate the test opens,
                       so that "the evaluation is in progress" lasts exactly as long as the test needs)
    FAKE_EVAL_FAIL_ON  substring of model_args that makes the run exit 1 (a failing configuration)
    FAKE_EVAL_NO_RESULTS  substring of model_args for which the run exits 0 without writing results
    FAKE_EVAL_DOCS     documents per task (default 40)
    FAKE_EVAL_EXPORT_ON  substring of model_args whose quantization report carries a packed-export block
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

TASK_METRICS = {
    # task -> (metric, per-doc value kind)
    "vqav2_val_local": ("exact_match", "mean"),
    "gqa_local": ("exact_match", "mean"),
    "coco2017_cap_val_local": ("coco_CIDEr", "caption"),
    "flickr30k_retrieval_local": ("t2i_r1", "retrieval"),
}
CAPTION_METRICS = ("coco_Bleu_1", "coco_Bleu_4", "coco_ROUGE_L", "coco_CIDEr")  # the pure-Python scorers
COLOURS = ("red", "blue", "green", "yellow")
SHAPES = ("square", "circle", "triangle")
PLACES = ("left", "right", "top", "bottom")
WRAPPER_KEYS = {"pretrained", "revision", "dtype", "device", "device_map", "trust_remote_code", "batch_size", "weight_cache",
                "max_batch_size", "report_dir", "lmms_quant_version", "vqa_prompt", "caption_prompt"}
COMPONENT_PARAMS = {"vit": 4000, "connector": 1000, "llm": 5000}
OTHER_PARAMS = 500


def parse_model_args(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if part)


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def component_bits(plan: dict[str, str]) -> dict[str, int]:
    if plan.get("method", "fp16") == "fp16":
        return {c: 16 for c in COMPONENT_PARAMS}
    return {c: int(plan.get(f"{c}_bits", 16)) for c in COMPONENT_PARAMS}


def doc_score(plan: dict[str, str], task: str, doc_id: int) -> float:
    bits = component_bits(plan)
    # VQA accuracy takes the values min(1, matches / 3) averaged over annotators: 0, 0.3, 0.6, 0.9, 1
    steps = (0.0, 0.3, 0.6, 0.9, 1.0)
    u = _unit(plan.get("method"), sorted(bits.items()), task, doc_id)
    return steps[min(4, int(u * quality(plan) * 6.25))]


def quality(plan: dict[str, str]) -> float:
    bits = component_bits(plan)
    return 0.8 - sum(0.5 / b for b in bits.values() if b < 16) + (0.05 if plan.get("method") == "gptq" else 0)


def caption_entry(plan: dict[str, str], task: str, doc_id: int) -> dict:
    """What lmms-eval's caption process_results returns for a doc: the prediction and the references."""
    c, s, p = (int(_unit(task, doc_id, part) * len(choices)) for part, choices in
               (("colour", COLOURS), ("shape", SHAPES), ("place", PLACES)))
    colour, shape, place = COLOURS[c], SHAPES[s], PLACES[p]
    other = COLOURS[(c + 1) % len(COLOURS)]
    refs = [f"a {colour} {shape} on the {place}", f"a {colour} {shape}", f"{colour} {shape} at the {place}"]
    u = _unit(plan.get("method"), sorted(component_bits(plan).items()), task, doc_id)
    q = quality(plan)
    pred = (refs[0] if u < q else f"a {other} {shape} on the {place}" if u < q + 0.15 else f"a {other} thing")
    return {"answer": refs, "pred": pred, "image_id": doc_id, "id": doc_id}


def caption_scores(entries: list[dict]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {e["image_id"]: e["answer"] for e in entries}
    res = {e["image_id"]: [e["pred"]] for e in entries}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"coco_Bleu_1": bleu[0], "coco_Bleu_4": bleu[3], "coco_ROUGE_L": Rouge().compute_score(gts, res)[0],
            "coco_CIDEr": Cider().compute_score(gts, res)[0]}


def rank_record(plan: dict[str, str], task: str, doc_id: int, n_docs: int) -> dict:
    """A retrieval rank record (two captions per image): rank 0 with probability ~ quality."""
    def rank(*part):
        u = _unit(plan.get("method"), sorted(component_bits(plan).items()), task, doc_id, *part)
        return 0 if u < quality(plan) + 0.1 else 1 + int(_unit(u, "rank") * 15)
    return {"protocol": "image_text", "i2t_rank": rank("i2t"), "t2i_ranks": [rank("t2i", 0), rank("t2i", 1)],
            "n_images": n_docs, "n_texts": 2 * n_docs}


RETRIEVAL_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r_mean", "t2i_r_mean", "r_mean")


def recall_scores(records: list[dict]) -> dict[str, float]:
    """R@K as lmms_quant.retrieval.recall_metrics defines it (not imported here: it imports torch,
    seconds per fake run; tests/test_leaderboard_stats.py checks the leaderboard against it)."""
    ranks = {"i2t": [r["i2t_rank"] for r in records], "t2i": [t for r in records for t in r["t2i_ranks"]]}
    out = {}
    for direction, found in ranks.items():
        for k in (1, 5, 10):
            out[f"{direction}_r{k}"] = 100.0 * sum(r < k for r in found) / len(found)
        out[f"{direction}_r_mean"] = sum(out[f"{direction}_r{k}"] for k in (1, 5, 10)) / 3
    out["r_mean"] = (out["i2t_r_mean"] + out["t2i_r_mean"]) / 2
    return out


def report_for(plan: dict[str, str], digest: str) -> dict:
    """A report in the schema of lmms_quant.quant.report.QuantReport.to_dict() (the fields the leaderboard reads)."""
    bits = component_bits(plan)
    group = int(plan.get("group_size", 128))
    overhead = 0.0 if group == -1 else 32 / max(group, 1)  # fp16 scale + zero-point per group of 128
    components, tensors = {}, []
    for name, n in COMPONENT_PARAMS.items():
        b = bits[name]
        bpw = 16.0 if b == 16 else b + overhead
        components[name] = {"params": n, "quantized_params": 0 if b == 16 else n, "bits_per_weight": bpw,
                            "size_bytes": int(n * bpw / 8)}
        if b != 16:
            tensors.append({"name": f"{name}.layers.0.fc1.weight", "component": name, "bits": b})
    components["other"] = {"params": OTHER_PARAMS, "quantized_params": 0, "bits_per_weight": 16.0,
                           "size_bytes": OTHER_PARAMS * 2}
    total_bits = sum(c["bits_per_weight"] * c["params"] for c in components.values())
    total_params = sum(c["params"] for c in components.values())
    return {
        "plan": plan, "plan_digest": digest, "components": components, "tensors": tensors,
        "total": {"params": total_params, "quantized_params": sum(c["quantized_params"] for c in components.values()),
                  "bits_per_weight": total_bits / total_params, "size_bytes": int(total_bits / 8)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model_args", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--log_samples", action="store_true")
    parser.add_argument("--limit", default=None)
    parser.add_argument("--batch_size", default=None)
    parser.add_argument("--seed", default=None)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    model_args = parse_model_args(args.model_args)
    _log("start", args)
    plan = {k: v for k, v in model_args.items() if k not in WRAPPER_KEYS}
    if os.environ.get("FAKE_EVAL_FAIL_ON") and os.environ["FAKE_EVAL_FAIL_ON"] in args.model_args:
        print("fake eval: failing as asked", file=sys.stderr)
        return 1
    pretrained = model_args["pretrained"].rstrip("/")
    name = "__".join(pretrained.split("/")[-2:])
    out = Path(args.output_path) / name
    out.mkdir(parents=True, exist_ok=True)
    date_id = time.strftime("%Y%m%d_%H%M%S")
    n_docs = int(os.environ.get("FAKE_EVAL_DOCS", "40"))
    n_eff = n_docs if args.limit is None else min(n_docs, int(float(args.limit)))
    results = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {},
               "n-samples": {}}
    for task in args.tasks.split(","):
        metric, kind = TASK_METRICS[task]
        lines, logged = [], []
        for doc_id in range(n_eff):
            line = {"doc_id": doc_id, "target": "answer",
                    "doc_hash": hashlib.sha256(f"{task}/{doc_id}".encode()).hexdigest(), "input": "Question?"}
            if kind == "mean":
                logged.append(doc_score(plan, task, doc_id))
                line[metric] = logged[-1]
            elif kind == "caption":  # caption metrics log the scorer's inputs, not a score
                logged.append(caption_entry(plan, task, doc_id))
                line.update({m: logged[-1] for m in CAPTION_METRICS})
            else:  # retrieval logs the doc's rank record under every metric
                logged.append(rank_record(plan, task, doc_id, n_eff))
                line.update({m: logged[-1] for m in RETRIEVAL_METRICS})
            line["filtered_resps"] = str(line.get(metric))
            lines.append(json.dumps(line))
        if args.log_samples:
            (out / f"{date_id}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        if kind == "mean":
            values = {metric: sum(logged) / len(logged)}
        elif kind == "caption":
            values = caption_scores(logged)
        else:
            values = recall_scores(logged)
        results["results"][task] = {"alias": task}
        for name, value in values.items():
            results["results"][task].update({f"{name},none": value, f"{name}_stderr,none": "N/A" if kind != "mean" else 0.01})
        results["higher_is_better"][task] = {name: True for name in values}
        results["n-samples"][task] = {"original": n_docs, "effective": n_eff}
    if plan.get("method", "fp16") != "fp16":
        digest = _recipe_digest(plan)
        report = report_for(plan, digest)
        if os.environ.get("FAKE_EVAL_EXPORT_ON") and os.environ["FAKE_EVAL_EXPORT_ON"] in args.model_args:
            report["export"] = {"format": "compressed-tensors", "dir": str(out / "packed"),
                                "file_bytes": int(report["total"]["size_bytes"] * 1.1),
                                "loaded_memory_bytes": None, "device": "cpu"}
        (out / f"quant_report_{digest}.json").write_text(json.dumps(report))
    if os.environ.get("FAKE_EVAL_SLEEP_ON", "") in args.model_args:
        time.sleep(float(os.environ.get("FAKE_EVAL_SLEEP", "0")))
        gate = os.environ.get("FAKE_EVAL_WAIT_FOR")
        deadline = time.monotonic() + 600
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
    if os.environ.get("FAKE_EVAL_NO_RESULTS") and os.environ["FAKE_EVAL_NO_RESULTS"] in args.model_args:
        return 0
    results["config"] = {"model": args.model, "model_args": args.model_args, "limit": args.limit,
                         "batch_size": args.batch_size}
    (out / f"{date_id}_results.json").write_text(json.dumps(results, indent=2))
    _log("end", args)
    return 0


def _recipe_digest(plan: dict[str, str]) -> str:
    """The digest the real wrapper gives this recipe (the leaderboard finds the report by it).

    Sweeps pass canonical model_args, which spell every resolved recipe key, so the digest is the
    hash of that spelling (`Recipe.digest`), computed here without importing the engine (torch)."""
    canonical = json.dumps(plan, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _log(event: str, args) -> None:
    if os.environ.get("FAKE_EVAL_LOG"):
        with open(os.environ["FAKE_EVAL_LOG"], "a") as log:
            log.write(json.dumps({"event": event, "pid": os.getpid(), "output_path": args.output_path,
                                  "model_args": args.model_args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                  "time": time.time()}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
