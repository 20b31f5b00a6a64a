"""Quantization speed and memory at real scale (one GPU), or on the tiny fixtures (CPU). A benchmark, not a test.

    python scripts/bench_gpu.py --arch blip2-opt-2.7b --device cuda --out benchmarks/gpu
    python scripts/bench_gpu.py --arch tiny --device cpu --out benchmarks/cpu

``blip2-opt-2.7b`` builds BLIP-2 OPT-2.7B from its published sizes (ViT-g 39x1408, Q-Former 12x768,
OPT 32x2560) with random weights (std 0.02; speed does not depend on values), fp16, and the
processor of the tiny fixture resized to 224 px and 32 query tokens. For every (method, component)
it restores the FP16 weights, runs `quantize` with 128 synthetic calibration samples (+32
held out) and records wall time, the time inside calibration forward passes and inside the method,
peak GPU memory and calibration throughput. It also checks, on one layer, that the CUDA-graph GPTQ
loop gives the codes of the kernel-by-kernel loop and times the pieces of the per-layer floor.
Results are written after every measurement (temp file + rename) to ``<out>/bench_<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _write(path: Path, data: dict) -> None:
    from lmms_quant.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1, default=str))


def _shapes_samples(n: int, seed: int):
    """Calibration samples straight from the shapes world (used where `datasets` is not installed)."""
    from lmms_quant.fixtures import shapes
    from lmms_quant.quant.calibration import sample_from_text

    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(n):
        scene = shapes.make_scene(rng)
        out.append(sample_from_text(shapes.render(scene, 224), shapes.captions(scene)[0]))
    return out


def build_blip2_opt_27b(device):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    from lmms_quant.fixtures.models import CLIP_MEAN, CLIP_STD, image_token_id, lm_tokenizer

    tok = lm_tokenizer(for_blip2=True)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                        num_attention_heads=16, image_size=224, patch_size=14,
                                        initializer_range=0.02).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, cross_attention_frequency=2,
                                          encoder_hidden_size=1408).to_dict(),
        text_config=OPTConfig(vocab_size=50272, hidden_size=2560, word_embed_proj_dim=2560, ffn_dim=10240,
                              num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id).to_dict(),
        num_query_tokens=32, image_token_index=image_token_id(tok),
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN),
                                           image_std=list(CLIP_STD), do_convert_rgb=True),
        tokenizer=tok, num_query_tokens=32)
    return model, processor


def build_tiny(device):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from lmms_quant.fixtures.models import build_tiny_blip2_opt

    path = build_tiny_blip2_opt(Path(tempfile.mkdtemp()) / "blip2_opt")
    return Blip2ForConditionalGeneration.from_pretrained(path).to(device).eval(), Blip2Processor.from_pretrained(path)


class Timers:
    """Wall time inside calibration passes and inside the method, per quantize call."""

    def __init__(self, device):
        from lmms_quant.quant import api, awq, calibration, gptq, rtn

        self.device, self.collect_s, self.method_s = device, 0.0, 0.0
        timers = self
        original_collect = calibration.Calibrator.collect

        def collect(self_, *args, **kwargs):
            _sync(timers.device)
            t0 = time.perf_counter()
            try:
                return original_collect(self_, *args, **kwargs)
            finally:
                _sync(timers.device)
                timers.collect_s += time.perf_counter() - t0

        calibration.Calibrator.collect = collect
        for module in (gptq, awq, rtn):
            original = module.quantize_unit

            def unit(*args, _original=original, **kwargs):
                _sync(timers.device)
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _sync(timers.device)
                    timers.method_s += time.perf_counter() - t0

            module.quantize_unit = unit
        self.api = api

    def reset(self):
        self.collect_s = self.method_s = 0.0


def layer_check(device, rows=2560, columns=10240) -> dict:
    """One OPT fc2-shaped layer: graph loop vs kernel-by-kernel loop (codes, time), and the floor pieces."""
    from lmms_quant.quant import gptq
    from lmms_quant.quant.quantizer import QuantGrid

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(8192, columns, device=device, generator=g, dtype=torch.float16)
    w = torch.randn(rows, columns, device=device, generator=g) * 0.02
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=128)
    out = {"shape": [rows, columns], "tokens": 8192}

    def timed(fn, repeat=1):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            result = fn()
        _sync(device)
        return result, (time.perf_counter() - t0) / repeat

    H = torch.zeros(columns, columns, device=device)
    _, out["hessian_addmm_s"] = timed(lambda: H.addmm_(x.float().T, x.float()), 3)
    H = x.float().T @ x.float()
    _, out["cholesky_inverse_s"] = timed(
        lambda: torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + torch.eye(columns, device=device))), upper=True))
    fast, out["gptq_layer_s"] = timed(lambda: gptq.quantize_layer(w, H, grid))
    fast, out["gptq_layer_s_second"] = timed(lambda: gptq.quantize_layer(w, H, grid))
    graphs = gptq._BlockLoop.graphs_disabled
    gptq._BlockLoop.graphs_disabled, gptq._BlockLoop._cache = True, {}
    try:
        eager, out["gptq_layer_eager_s"] = timed(lambda: gptq.quantize_layer(w, H, grid))
    finally:
        gptq._BlockLoop.graphs_disabled, gptq._BlockLoop._cache = graphs, {}
    out["graph_used"] = not graphs and torch.device(device).type == "cuda"
    out["codes_equal_graph_vs_eager"] = bool(torch.equal(fast.codes, eager.codes))
    out["codes_mismatch_fraction"] = float((fast.codes != eager.codes).float().mean())
    return out


def eval_throughput(model, processor, device, n_images=32, batch=8, new_tokens=30) -> dict:
    samples = _shapes_samples(n_images, seed=7)
    prompts = ["Question: what is in the image? Answer:"] * batch
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n_images, batch):
            inputs = processor(images=[s.image for s in samples[start:start + batch]], text=prompts,
                               return_tensors="pt", padding=True).to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return {"images": n_images, "batch": batch, "new_tokens": new_tokens,
            "images_per_s": n_images / (time.perf_counter() - t0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("blip2-opt-2.7b", "tiny"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--runs", default="gptq:all,rtn:all,awq:all,gptq:llm,gptq:vit,gptq:connector",
                        help="comma-separated method:component pairs, in order")
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no new run after this many seconds")
    parser.add_argument("--layer-check", action="store_true")
    parser.add_argument("--eval", action="store_true", help="generation throughput FP16 vs after the first run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    device = args.device

    from lmms_quant.quant import Recipe, calibration, quantize

    try:
        import datasets  # noqa: F401
        samples_from = "lmms_quant.fixtures calibration_samples"
    except ImportError:
        from lmms_quant.quant import api

        calibration.load_samples = api.load_samples = lambda calib, n, seed: _shapes_samples(n, seed)
        samples_from = "shapes world (datasets not installed)"

    import transformers

    result = {
        "arch": args.arch, "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "card": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv), "calib_samples_from": samples_from, "runs": [],
    }
    out_path = args.out / f"bench_{args.arch}.json"
    if args.layer_check:
        result["layer_check"] = layer_check(device) if args.arch != "tiny" else layer_check(device, 64, 256)
        print("layer check", result["layer_check"], flush=True)
        _write(out_path, result)

    t0 = time.perf_counter()
    model, processor = (build_blip2_opt_27b if args.arch != "tiny" else build_tiny)(device)
    _sync(device)
    result["build_s"] = time.perf_counter() - t0
    result["fp16_weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    timers = Timers(device)
    if args.eval:
        result["eval_fp16"] = eval_throughput(model, processor, device)
        print("eval fp16", result["eval_fp16"], flush=True)
    _write(out_path, result)

    for index, spec in enumerate(args.runs.split(",")):
        if time.perf_counter() - started > args.deadline_s:
            result.setdefault("not_run", []).append(spec)
            continue
        method, component = spec.split(":")
        if index:
            model.load_state_dict(pristine)
        plan = Recipe.parse({"method": method, "component": component, "bits": 4, "group_size": 128,
                                      "calib_n": args.calib_n, "calib_batch_size": args.calib_batch_size})
        timers.reset()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        report = quantize(model, processor, plan, device=device, progress=False)
        _sync(device)
        wall = time.perf_counter() - t0
        n_holdout = report.calibration["holdout_samples"]
        n_units = report.timing["units"]
        passes = (args.calib_n if method != "rtn" else 0) + n_holdout
        run = {"method": method, "component": component, "wall_s": wall, "calibration_forward_s": timers.collect_s,
               "method_s": timers.method_s, "other_s": wall - timers.collect_s - timers.method_s,
               "units": n_units, "linears": len(report.tensors),
               "calibration_samples_per_s": passes * n_units / timers.collect_s if timers.collect_s else None,
               "mean_output_error": sum(t.output_error or 0 for t in report.tensors) / max(1, len(report.tensors))}
        if torch.device(device).type == "cuda":
            run["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
            run["peak_above_weights_gib"] = run["peak_gpu_gib"] - result["fp16_weights_gib"]
        if args.eval and index == 0:
            run["eval_quantized"] = eval_throughput(model, processor, device)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        _write(out_path, result)
    result["total_s"] = time.perf_counter() - started
    _write(out_path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
