"""Test double of the `lmms-quant eval` subprocess: writes lmms-eval's output layout in a fraction of a second.

Used by the sweep and leaderboard tests as ``--eval-command "<python> tests/fake_eval_output.py"``, so
that kill/resume and the leaderboard can be tested on many configurations without running models.
What it writes follows lmms-eval 0.7.3 (notes/lmms-eval.md §6) and the model wrappers:

    <output_path>/<model_name_sanitized>/<YYYYmmdd_HHMMSS>_results.json
    <output_path>/<model_name_sanitized>/<YYYYmmdd_HHMMSS>_samples_<task>.jsonl   (--log_samples)
    <output_path>/<model_name_sanitized>/quant_report_<plan digest>.json          (quantized plans)

Scores are a deterministic function of the plan and the document (fewer bits -> lower scores), so two
runs of one configuration give identical files apart from the timestamp in their names.

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
    "coco2017_cap_val_local": ("coco_CIDEr", "corpus"),
}
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
    quality = 0.8 - sum(0.5 / b for b in bits.values() if b < 16) + (0.05 if plan.get("method") == "gptq" else 0)
    # VQA accuracy takes the values min(1, matches / 3) averaged over annotators: 0, 0.3, 0.6, 0.9, 1
    steps = (0.0, 0.3, 0.6, 0.9, 1.0)
    u = _unit(plan.get("method"), sorted(bits.items()), task, doc_id)
    return steps[min(4, int(u * quality * 6.25))]


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
        lines, scores = [], []
        for doc_id in range(n_eff):
            score = doc_score(plan, task, doc_id)
            scores.append(score)
            line = {"doc_id": doc_id, "target": "answer", "filtered_resps": f"answer {score}",
                    "doc_hash": hashlib.sha256(f"{task}/{doc_id}".encode()).hexdigest(), "input": "Question?"}
            if kind == "mean":
                line[metric] = score
            else:  # caption metrics log the scorer's inputs, not a score
                line[metric] = {"answer": ["a red square", "a square"], "pred": f"caption {score}", "image_id": doc_id}
            lines.append(json.dumps(line))
        if args.log_samples:
            (out / f"{date_id}_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        value = sum(scores) / len(scores) if kind == "mean" else 1.5 * sum(scores) / len(scores)
        results["results"][task] = {"alias": task, f"{metric},none": value,
                                    f"{metric}_stderr,none": "N/A" if kind == "corpus" else 0.01}
        results["higher_is_better"][task] = {metric: True}
        results["n-samples"][task] = {"original": n_docs, "effective": n_eff}
    if plan.get("method", "fp16") != "fp16":
        digest = _recipe_digest(plan)
        (out / f"quant_report_{digest}.json").write_text(json.dumps(report_for(plan, digest)))
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
