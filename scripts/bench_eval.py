"""Evaluation speed through lmms-eval's own loop, stock vs fast generation, on one GPU. A benchmark, not a test.

    python scripts/bench_eval.py --out benchmarks/eval                       # CUDA: real-size models
    python scripts/bench_eval.py --arch tiny --device cpu --out /tmp/bench   # CPU smoke run on tiny fixtures

Real size: BLIP-2 OPT-2.7B (`bench_gpu.build_blip2_opt_27b`) and LLaVA-1.5-7B
(`bench_eval_setup.build_llava_15_7b`), random weights, fp16, saved once to ``--scratch`` and loaded
by the wrappers. Both generation paths run on one loaded model, one after the other, at the same
batch size, through ``lmms_eval.evaluator.simple_evaluate`` on a synthetic caption task (COCO's
prompt, 30 new tokens) and lmms-eval's VQAv2 task with 5 questions per image, each >= 1,000
documents. EOS is switched off so that every request decodes exactly its ``max_new_tokens``.
Images/s counts the time inside the wrapper's generate_until; the whole simple_evaluate time is kept
beside it. Each (path, task) is warmed up on one batch first (CUDA graphs, kernel selection) with a
fresh generation path afterwards, so no image feature is carried into the timed run.

Also measured: the agreement of fast vs stock greedy tokens on the shipped trained tiny models on
this device (fp32 and fp16), and a sweep of 4 LLM-only configurations (RTN 8/6/4/3 bits on the
LLM) sharing a feature cache, with the vision tower's forward passes counted by a hook. Results are
written after every step (temp file + rename) to ``<out>/bench_eval_<arch>.json``; a markdown table
with the rooflines and targets is printed at the end.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_FLOPS, PEAK_BYTES = 989e12, 4.8e12  # H200 dense fp16, HBM3e
MODELS = {
    "blip2": {"model_id": "quant_blip2", "asset": "tiny_blip2", "builder": "build_blip2_opt_27b"},
    "llava": {"model_id": "quant_llava", "asset": "tiny_llava", "builder": "build_llava_15_7b"},
}
SIZES = {  # caption images, VQA images (x 5 questions), batch, sweep images
    "real": dict(caption_images=1024, vqa_images=200, batch=64, sweep_images=128, image_size=336),
    "tiny": dict(caption_images=16, vqa_images=4, batch=4, sweep_images=8, image_size=64),
}


def roofline(model: str, batch: int) -> dict:
    """Images/s bounds from the brief: BLIP-2's ViT-g prefill is 0.5 TFLOP/image and each of 30 decode
    steps reads 7.5 GB per batch; LLaVA's prefill is 621 tokens x 14 GFLOP per image."""
    if model == "blip2":
        seconds = batch * 0.5e12 / PEAK_FLOPS + 30 * 7.5e9 / PEAK_BYTES
        return {"caption": batch / seconds, "formula": "B / (B*0.5e12/989e12 + 30*7.5e9/4.8e12)"}
    return {"caption": PEAK_FLOPS / (621 * 14e9), "formula": "989e12 / (621 * 14e9) (prefill only)"}


TARGETS = {("blip2", "caption"): (4.0, 0.7), ("llava", "caption"): (2.0, 0.8),
           ("blip2", "vqa"): (3.0, None), ("llava", "vqa"): (3.0, None)}


class Bench:
    def __init__(self, args):
        from lmms_quant.atomic import write_json_atomic

        self.args, self.started = args, time.perf_counter()
        self.sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SIZES[args.arch].items()}
        self.device, self.scratch = torch.device(args.device), Path(args.scratch)
        self.dtype = "float16" if self.device.type == "cuda" else "float32"
        self.path = Path(args.out) / f"bench_eval_{args.arch}.json"
        self.write = lambda: write_json_atomic(self.path, self.result, sort_keys=False)
        import transformers

        self.result = {"arch": args.arch, "device": str(self.device), "dtype": self.dtype, "sizes": self.sizes,
                       "card": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "command": " ".join(sys.argv), "runs": [], "not_run": []}

    def late(self, what: str) -> bool:
        if time.perf_counter() - self.started > self.args.deadline_s:
            self.result["not_run"].append(what)
            print(f"deadline: {what} not run", flush=True)
            return True
        return False

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ lmms-eval

    def load(self, model_id: str, checkpoint, batch: int, dtype: str | None = None, **model_args):
        from lmms_eval.models import get_model

        arg_string = ",".join([f"pretrained={checkpoint}", f"dtype={dtype or self.dtype}", f"device={self.device}",
                               *(f"{k}={v}" for k, v in model_args.items())])
        evaluator = {"batch_size": str(batch), "max_batch_size": None}  # what lmms-eval's evaluator passes
        return get_model(model_id).create_from_arg_string(arg_string, evaluator)

    def evaluate(self, lm, task: str, limit=None) -> dict:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        spent = {"generate_s": 0.0}
        inner = type(lm).generate_until.__get__(lm)

        def timed(requests):
            self.sync()
            t0 = time.perf_counter()
            out = inner(requests)
            self.sync()
            spent["generate_s"] += time.perf_counter() - t0
            spent["requests"] = len(requests)
            return out

        lm.generate_until = timed
        # lmms-eval deletes the model's modules after each evaluation (lm.clean()); one loaded model serves
        # several evaluations here.
        lm.clean = lambda: None
        t0 = time.perf_counter()
        try:
            out = simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_path=str(self.tasks), model_name=type(lm).__name__))
        finally:
            del lm.generate_until, lm.clean
        spent["total_s"] = time.perf_counter() - t0
        spent["scores"] = {k: v for k, v in out["results"][task].items() if "stderr" not in k and k != "alias"}
        return spent

    # ------------------------------------------------------------------ measurements

    def throughput(self, name: str) -> None:
        """Stock vs fast on one loaded model, caption and VQA, at the same batch size."""
        from lmms_quant.model_wrappers.generation import GenerationPath

        spec, batch = MODELS[name], self.sizes["batch"]
        checkpoint = self.checkpoint(name)
        lm = self.load(spec["model_id"], checkpoint, batch)
        decode_exactly_max_new_tokens(lm)
        run = {"model": name, "batch": batch, "checkpoint": str(checkpoint), "tasks": {}}
        self.result["runs"].append(run)
        for task, kind in (("bench_caption", "caption"), ("bench_vqa", "vqa")):
            for path_name, fast in [(p, p == "fast") for p in self.args.path_names]:
                if self.late(f"{name} {kind} {path_name}"):
                    continue
                try:
                    lm._generation_path = GenerationPath(lm, fast=fast)
                    self.evaluate(lm, task, limit=batch)  # warm-up
                    lm._generation_path = GenerationPath(lm, fast=fast)
                    measured = self.evaluate(lm, task)
                except Exception as err:  # noqa: BLE001 - recorded; the other measurements still run
                    import traceback

                    traceback.print_exc()
                    run["tasks"].setdefault(kind, {})[path_name] = {"error": f"{type(err).__name__}: {err}"}
                    lm._generation_path = None
                    self.free()
                    continue
                images = measured["requests"] / (5 if kind == "vqa" else 1)
                measured.update(images=images, images_per_s=images / measured["generate_s"],
                                path=lm._generation_path.summary())
                run["tasks"].setdefault(kind, {})[path_name] = measured
                print(f"{name} {kind} {path_name}: {measured['images_per_s']:.1f} images/s "
                      f"({measured['requests']} requests in {measured['generate_s']:.1f} s)"
                      f"{time_breakdown(measured['path'])}", flush=True)
                self.write()
        fast = run["tasks"].get("caption", {}).get("fast")
        if fast and "path" in fast:
            run["caption_prompt_tokens"] = fast["path"]["prompt_tokens"] / max(1, fast["path"]["fast_requests"])
        del lm
        self.free()

    def checkpoint(self, name: str) -> Path:
        if self.args.arch == "tiny":
            from lmms_quant.fixtures.models import build_tiny_blip2_opt, build_tiny_llava

            out = self.scratch / f"tiny_{name}"
            if not out.is_dir():
                (build_tiny_blip2_opt if name == "blip2" else build_tiny_llava)(out, seed=0)
            return out
        from lmms_quant.scripts import bench_eval_setup as setup

        out = self.scratch / f"{name}_real"
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            model, processor = getattr(setup, MODELS[name]["builder"])(self.device)
            setup.save_checkpoint(model, processor, out)
            del model
            self.free()
            self.result.setdefault("build_s", {})[name] = time.perf_counter() - t0
        return out

    def free(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def agreement(self) -> None:
        """Fast vs stock greedy tokens, row by row, on the shipped trained models (every local task request)."""
        from lmms_quant.fixtures.datasets import write_lmms_eval_datasets
        from lmms_quant.tasks_path import render_tasks

        data = self.scratch / "agreement"
        write_lmms_eval_datasets(data / "data", n_images=self.args.agreement_images, seed=0)
        include = render_tasks(data / "data", data / "tasks")
        assets = ROOT / "lmms_quant" / "assets"
        out = self.result["agreement"] = {}
        for name, spec in MODELS.items():
            for dtype in ("float32", "float16") if self.device.type == "cuda" else ("float32",):
                if self.late(f"agreement {name} {dtype}"):
                    continue
                yamls = [self.tasks / "bench_caption.yaml", include / "vqav2_val_local.yaml",
                         include / "gqa_local.yaml"]
                out[f"{name}/{dtype}"] = token_agreement(self, spec["model_id"], assets / spec["asset"], yamls, dtype)
                print(f"agreement {name} {dtype}: {out[f'{name}/{dtype}']}", flush=True)
                self.write()

    def sweep(self) -> None:
        """4 LLM-only configurations sharing a feature cache: the vision tower sees each image once in all."""
        from lmms_quant.model_wrappers.generation import GenerationPath

        if self.late("sweep"):
            return
        features = self.scratch / "features"
        shutil.rmtree(features, ignore_errors=True)
        checkpoint, rows = self.checkpoint("blip2"), []
        for bits in (8, 6, 4, 3):
            if self.late(f"sweep rtn llm {bits}"):
                continue
            lm = self.load("quant_blip2", checkpoint, self.sizes["batch"], method="rtn", component="llm", bits=bits,
                           calib_n=8, feature_cache=features)
            decode_exactly_max_new_tokens(lm)
            path = lm._generation_path = GenerationPath(lm, fast=True)
            seen, serving = [0], [False]
            serve = path.generate_until

            def generate_until(requests):  # runs after quantization (whose calibration passes are not counted)
                serving[0] = True
                try:
                    return serve(requests)
                finally:
                    serving[0] = False

            path.generate_until = generate_until

            def count(module, args, kwargs):
                if serving[0]:
                    pixels = kwargs.get("pixel_values", args[0] if args else None)
                    seen[0] += int(pixels.shape[0])

            hook = lm.model.vision_model.register_forward_pre_hook(count, with_kwargs=True)
            measured = self.evaluate(lm, "bench_caption", limit=self.sizes["sweep_images"])
            hook.remove()
            rows.append({"config": f"rtn llm {bits}-bit", "images": measured["requests"],
                         "vision_forward_images": seen[0],
                         "generate_s": measured["generate_s"], "path": lm._generation_path.summary()})
            print(f"sweep rtn llm {bits}-bit: vision tower saw {seen[0]} images for {measured['requests']}", flush=True)
            del lm
            self.free()
        self.result["sweep"] = {"configs": rows, "vision_forward_images": sum(r["vision_forward_images"] for r in rows),
                                "distinct_images": self.sizes["sweep_images"]}
        self.write()


def decode_exactly_max_new_tokens(lm) -> None:
    """Random weights emit EOS at random; without it every request decodes its max_new_tokens on both paths."""
    for owner in (lm.model, getattr(lm.model, "language_model", None)):
        config = getattr(owner, "generation_config", None)
        if config is not None:
            config.eos_token_id = None


def token_agreement(bench: Bench, model_id: str, checkpoint: Path, yamls: list[Path], dtype: str) -> dict:
    """Per request: the fast path's new tokens vs transformers generate's on the same batch of 16."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config

    from lmms_quant.model_wrappers.generation import GenerationPath, order_rows
    from lmms_quant.model_wrappers.requests import hf_generate_kwargs

    lm = bench.load(model_id, checkpoint, 16, dtype=dtype)
    rows_equal = rows_total = tokens_equal = tokens_total = 0
    pad = lm.tokenizer.pad_token_id
    for yaml_path in yamls:  # captions through the bench's task: COCO's metric needs pycocoevalcap and Java
        task = ConfigurableMessagesTask(config=load_yaml_config(str(yaml_path), mode="full"), model_name=model_id)
        task.build_all_requests(limit=bench.args.agreement_images * 5, rank=0, world_size=1)
        lm.task_dict[task.config.task] = task.dataset
        path = GenerationPath(lm, fast=True)
        (rows, greedy, _), _ = path._split(task.instances, list(range(len(task.instances))))
        path._setup()
        kwargs, _ = hf_generate_kwargs(task.instances[0].args[2], pad)
        rows = order_rows(rows)
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            fast = path._generate(chunk, greedy, len(chunk), None).cpu()
            inputs = lm.processor_inputs([r.prompt for r in chunk], [[r.image] for r in chunk])
            inputs = inputs.to(bench.device).to(lm.model.dtype)
            with torch.no_grad():
                stock = lm.model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:].cpu()
            width = max(fast.shape[1], stock.shape[1])
            fast = torch.nn.functional.pad(fast, (0, width - fast.shape[1]), value=greedy.pad_token_id)
            stock = torch.nn.functional.pad(stock, (0, width - stock.shape[1]), value=greedy.pad_token_id)
            rows_equal += int((fast == stock).all(dim=1).sum())
            rows_total += len(chunk)
            tokens_equal += int((fast == stock).sum())
            tokens_total += fast.numel()
    del lm
    bench.free()
    return {"rows": rows_total, "rows_equal": rows_equal, "row_agreement": rows_equal / max(1, rows_total),
            "tokens": tokens_total, "token_agreement": tokens_equal / max(1, tokens_total)}


def time_breakdown(path: dict) -> str:
    """Where a fast run's time went (GPU phases by CUDA events; waits and CPU work on the main thread)."""
    seconds = path.get("time_s") or {}
    if not seconds:
        return ""
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]))
    decoder = path.get("decoder", {})
    steps = decoder.get("graph_replays", 0) + decoder.get("eager_steps", 0)
    per_step = f"; {1000 * seconds.get('decode', 0) / steps:.2f} ms per decode step" if steps else ""
    return f" [{parts}{per_step}]"


def table(result: dict) -> str:
    lines = ["| model | task | batch | stock img/s | fast img/s | speed-up | roofline img/s | fast / roofline | "
             "target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for kind, paths in run["tasks"].items():
            stock, fast = paths.get("stock"), paths.get("fast")
            if not (stock and fast) or "error" in stock or "error" in fast:
                continue
            speedup = fast["images_per_s"] / stock["images_per_s"]
            bound = roofline(run["model"], run["batch"]).get(kind) if result["arch"] == "real" else None
            need_speedup, need_roof = TARGETS[(run["model"], kind)]
            roof_ok = need_roof is None or (bound is not None and fast["images_per_s"] / bound >= need_roof)
            met = speedup >= need_speedup and roof_ok
            target = f">= {need_speedup:g}x stock" + (f", >= {need_roof:g} roofline" if need_roof else "")
            bound_cell = "" if bound is None else f"{bound:.0f}"
            ratio_cell = "" if bound is None else f"{fast['images_per_s'] / bound:.2f}"
            lines.append(f"| {run['model']} | {kind} | {run['batch']} | {stock['images_per_s']:.1f} | "
                         f"{fast['images_per_s']:.1f} | {speedup:.2f}x | {bound_cell} | {ratio_cell} | {target} | "
                         f"{'yes' if met else 'no'} |")
    for model in ("blip2", "llava"):
        lines.append(f"\nroofline {model}: {roofline(model, 64)['formula']}")
    if "sweep" in result:
        sweep = result["sweep"]
        lines.append(f"\nsweep (4 LLM-only configurations, shared feature cache): the vision tower saw "
                     f"{sweep['vision_forward_images']} images for {sweep['distinct_images']} distinct images")
    for run in result["runs"]:
        for kind, paths in run["tasks"].items():
            fast = paths.get("fast") or {}
            if "path" in fast:
                lines.append(f"{run['model']} {kind} fast:{time_breakdown(fast['path'])}")
    for what, error in result.get("errors", {}).items():
        lines.append(f"error in {what}: {error}")
    for run in result["runs"]:
        for kind, paths in run["tasks"].items():
            for path_name, measured in paths.items():
                if "error" in measured:
                    lines.append(f"error in {run['model']} {kind} {path_name}: {measured['error']}")
    for key, value in result.get("agreement", {}).items():
        lines.append(f"agreement {key}: rows {value['row_agreement']:.4f}, tokens {value['token_agreement']:.4f} "
                     f"({value['rows']} requests)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "eval")
    parser.add_argument("--arch", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/lmms_quant_bench_eval"))
    parser.add_argument("--models", default="blip2,llava")
    parser.add_argument("--caption-images", dest="caption_images", type=int)
    parser.add_argument("--vqa-images", dest="vqa_images", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--sweep-images", dest="sweep_images", type=int)
    parser.add_argument("--image-size", dest="image_size", type=int)
    parser.add_argument("--agreement-images", dest="agreement_images", type=int, default=24)
    parser.add_argument("--steps", default="agreement,throughput,sweep",
                        help="which measurements, in this order: agreement, throughput, sweep")
    parser.add_argument("--deadline-s", dest="deadline_s", type=float, default=420,
                        help="start nothing new after this many seconds")
    parser.add_argument("--paths", default="stock,fast", help="generation paths measured: stock, fast or both")
    parser.add_argument("--prepare-threads", dest="prepare_threads", type=int, default=None,
                        help="the fast path's preparing threads [LMMS_QUANT_PREPARE_THREADS, else 3]")
    parser.add_argument("--switch-interval-ms", dest="switch_interval_ms", type=float, default=None,
                        help="the interpreter switch interval while the fast path serves [generation.SWITCH_INTERVAL_S]")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",")]
    if not paths or any(p not in ("stock", "fast") for p in paths):
        print(f"bench_eval: --paths {args.paths!r}; valid: stock, fast or stock,fast", file=sys.stderr)
        return 2
    args.path_names = paths
    wanted = {w.strip() for w in args.steps.split(",")}
    unknown = wanted - {"agreement", "throughput", "sweep"}
    if unknown:
        print(f"bench_eval: --steps {args.steps!r}: unknown {sorted(unknown)}; valid: agreement, throughput, sweep",
              file=sys.stderr)
        return 2
    missing = [m for m in ("lmms_eval", "datasets", "lmms_quant.model_wrappers") if not _importable(m)]
    if missing:
        print(f"bench_eval: cannot import {', '.join(missing)}; install lmms-quant and lmms-eval first "
              f"(see scripts/bench_eval_wheels.sh for a machine without an index)", file=sys.stderr)
        return 2
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmms_quant.scripts.bench_eval_setup import write_bench_tasks

    from lmms_quant.model_wrappers import generation, prepare

    if args.prepare_threads is not None:
        os.environ[prepare.THREADS_ENV] = str(args.prepare_threads)
    if args.switch_interval_ms is not None:
        generation.SWITCH_INTERVAL_S = args.switch_interval_ms / 1000
    bench = Bench(args)
    bench.result["fast_path_settings"] = {"prepare_threads": prepare.preparing_threads(),
                                          "switch_interval_ms": generation.SWITCH_INTERVAL_S * 1000}
    bench.tasks = write_bench_tasks(bench.scratch / "bench_tasks", bench.sizes["caption_images"],
                                    bench.sizes["vqa_images"], image_size=bench.sizes["image_size"])
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    # Most telling first: a step that fails is recorded and the next one runs.
    steps = [("agreement", bench.agreement)] if "agreement" in wanted else []
    if "throughput" in wanted:
        steps += [(f"throughput {n}", lambda n=n: bench.throughput(n)) for n in names]
    if "sweep" in wanted and "blip2" in names:
        steps.append(("sweep", bench.sweep))
    for what, step in steps:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - a benchmark reports what broke and goes on
            import traceback

            traceback.print_exc()
            bench.result.setdefault("errors", {})[what] = f"{type(err).__name__}: {err}"
            bench.free()
        bench.write()
    bench.result["total_s"] = time.perf_counter() - bench.started
    bench.result["table"] = table(bench.result)
    bench.write()
    print(bench.result["table"])
    print(f"written {bench.path}")
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
