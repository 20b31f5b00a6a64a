"""Where a fast-path batch's GPU time goes, by phase and by kernel, on real-size models. A diagnostic, not a test.

    python scripts/profile_eval.py --out $OUT            # CUDA; writes profile_eval.json and prints tables

For BLIP-2 OPT-2.7B (loaded through ``from_pretrained`` as the wrapper loads it, so the Q-Former is
where transformers keeps it) and LLaVA-1.5-7B, random fp16 weights, batch 64: the vision tower and
connector, the prefill and one decode step of `decoding.StaticCacheDecoder`, each timed with CUDA
events and profiled (top kernels by GPU time); beside them what this card sustains on the same
shapes (an fp16 GEMM of each model's largest shape, a device-to-device copy), so a phase's distance
from its bound is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def top_kernels(fn, n: int = 14) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    for e in sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:n]:
        us = getattr(e, "self_device_time_total", 0)
        rows.append({"kernel": e.key[:110], "ms": us / 1000, "share": us / total, "calls": e.count})
    return [{"total_ms": total / 1000}] + rows


def ceilings(shapes: dict[str, tuple[int, int, int]]) -> dict:
    out = {f"gemm {name} {m}x{k}x{n} TFLOP/s": _gemm_tflops(m, k, n) for name, (m, k, n) in shapes.items()}
    out["copy 4 GiB read+write TB/s"] = _copy_tbps(4 << 30)
    torch.cuda.empty_cache()
    return out


def _gemm_tflops(m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    b = torch.randn(k, n, device="cuda", dtype=torch.float16)
    return 2 * m * k * n / timed(lambda: a @ b) / 1e12


def _copy_tbps(size: int) -> float:
    x = torch.empty(size, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * size / timed(lambda: y.copy_(x)) / 1e12


def attempt(res: dict, key: str, fn) -> None:
    """res[key] = fn(), or the error (one failed measurement does not cost the others)."""
    try:
        res[key] = fn()
    except Exception as err:  # noqa: BLE001
        res[key] = f"error: {type(err).__name__}: {err}"
        print(key, res[key], flush=True)


@torch.no_grad()
def decoder_profile(parts, prefix: int, suffix: int, batch: int, new_tokens: int = 30) -> dict:
    from lmms_quant.model_wrappers.decoding import Greedy, Prompts, StaticCacheDecoder, PhaseClock

    hidden = parts.model.get_input_embeddings().weight.shape[1]
    dtype = parts.embed_dtype
    g = torch.Generator(device="cuda").manual_seed(0)
    prompts = Prompts(torch.randn(batch, prefix, hidden, device="cuda", dtype=dtype, generator=g) * 0.02,
                      torch.arange(batch, device="cuda"),
                      torch.randn(batch, suffix, hidden, device="cuda", dtype=dtype, generator=g) * 0.02,
                      torch.ones(batch, suffix, dtype=torch.bool, device="cuda"))
    greedy = Greedy(new_tokens, (), 0)
    decoder = StaticCacheDecoder(parts, torch.device("cuda"), use_graph=True)
    decoder.generate(prompts, greedy)  # capture
    clock = PhaseClock("cuda")
    runs = 3
    for _ in range(runs):
        decoder.generate(prompts, greedy, clock=clock)
    phases = {k: v / runs for k, v in clock.totals().items()}
    state = decoder._state
    step_graph = phases.get("decode", 0.0) / (new_tokens - 1)

    def fresh():  # the state as generate leaves it after the prefill (the step counters start over)
        state.cache.reset()
        decoder._start_decode(state, prompts, decoder._prefill(state, prompts))

    fresh()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    decoder._step(state)
    start.record()
    for _ in range(5):
        decoder._step(state)
    end.record()
    end.synchronize()
    step_eager = start.elapsed_time(end) / 5 / 1000
    prefill = top_kernels(lambda: (state.cache.reset(), decoder._prefill(state, prompts)))
    fresh()
    step = top_kernels(lambda: decoder._step(state))
    return {"batch": batch, "prefix": prefix, "suffix": suffix, "cache_len": state.length, "phases_s": phases,
            "step_graph_ms": step_graph * 1000, "step_eager_ms": step_eager * 1000,
            "prefill_kernels": prefill, "step_kernels": step}


@torch.no_grad()
def blip2(out: dict, scratch: Path, batch: int) -> None:
    from transformers import Blip2ForConditionalGeneration

    from lmms_quant.model_wrappers.vlm_parts import parts_for
    from lmms_quant.scripts.bench_gpu import build_blip2_opt_27b

    path = scratch / "blip2_profile"
    if not (path / "config.json").is_file():
        model, processor = build_blip2_opt_27b("cuda")
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float16, device_map="cuda").eval()
    res = out["blip2"] = {"attn": {n: getattr(c, "_attn_implementation", None) for n, c in (
        ("model", model.config), ("vision", model.config.vision_config), ("qformer", model.config.qformer_config),
        ("text", model.config.text_config))},
        "dtypes": {"vision": str(model.vision_model.dtype), "qformer": str(next(model.qformer.parameters()).dtype),
                   "projection": str(model.language_projection.weight.dtype), "lm": str(model.language_model.dtype)},
        "keep_in_fp32": list(getattr(model, "_keep_in_fp32_modules", None) or [])}
    print(json.dumps(res), flush=True)
    parts, _ = parts_for(model)
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    vis = model.vision_model(pixel_values=pixels).last_hidden_state
    qdtype = next(model.qformer.parameters()).dtype
    q = model.query_tokens.expand(batch, -1, -1).to(qdtype)

    def qformer():
        return model.qformer(query_embeds=q, encoder_hidden_states=vis.to(qdtype))

    def with_tf32(fn):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    def vision_with(impl):
        previous = model.vision_model.config._attn_implementation
        model.vision_model.config._attn_implementation = impl
        try:
            return timed(lambda: model.vision_model(pixel_values=pixels))
        finally:
            model.vision_model.config._attn_implementation = previous

    attempt(res, "vision_model_s", lambda: timed(lambda: model.vision_model(pixel_values=pixels)))
    attempt(res, "qformer_s", lambda: timed(qformer))
    attempt(res, "qformer_tf32_s", lambda: with_tf32(lambda: timed(qformer)))
    attempt(res, "image_features_s", lambda: timed(lambda: parts.image_features(pixels)))
    attempt(res, "vision_model_eager_s", lambda: vision_with("eager"))
    if isinstance(res.get("vision_model_s"), float):
        res["vision_tflops_equiv"] = batch * 0.5e12 / res["vision_model_s"] / 1e12
    attempt(res, "vision_kernels", lambda: top_kernels(lambda: model.vision_model(pixel_values=pixels)))
    attempt(res, "features_kernels", lambda: top_kernels(lambda: parts.image_features(pixels)))
    print({k: v for k, v in res.items() if k.endswith("_s") or k.endswith("equiv")}, flush=True)
    attempt(res, "decode", lambda: decoder_profile(parts, prefix=32, suffix=1, batch=batch))
    print({k: v for k, v in res["decode"].items() if "kernels" not in k} if isinstance(res["decode"], dict)
          else res["decode"], flush=True)


@torch.no_grad()
def llava(out: dict, batch: int) -> None:
    from lmms_quant.model_wrappers.vlm_parts import parts_for
    from lmms_quant.scripts.bench_gpu import build_llava_15_7b

    model, _ = build_llava_15_7b("cuda")
    res = out["llava"] = {"attn": {n: getattr(c, "_attn_implementation", None) for n, c in (
        ("model", model.config), ("vision", model.config.vision_config), ("text", model.config.text_config))}}
    parts, _ = parts_for(model)
    pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.float16)
    attempt(res, "image_features_s", lambda: timed(lambda: parts.image_features(pixels), reps=3))
    attempt(res, "decode", lambda: decoder_profile(parts, prefix=612, suffix=1, batch=batch))
    print({k: v for k, v in res["decode"].items() if "kernels" not in k} if isinstance(res["decode"], dict)
          else res["decode"], flush=True)
    print({k: v for k, v in res.items() if k.endswith("_s")}, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", default="/tmp/lmms_quant_profile")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--models", default="blip2,llava")
    args = parser.parse_args(argv)
    from lmms_quant.atomic import write_json_atomic

    out: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    target = Path(args.out) / "profile_eval.json"
    started = time.perf_counter()
    out["ceilings"] = ceilings({"vit-g mlp": (args.batch * 257, 1408, 6144), "opt decode fc1": (args.batch, 2560, 10240),
                                "llama prefill mlp": (args.batch * 613, 4096, 11008), "square": (8192, 8192, 8192)})
    print(out["ceilings"], flush=True)
    write_json_atomic(target, out)
    for name in args.models.split(","):
        try:
            torch.cuda.empty_cache()
            {"blip2": lambda: blip2(out, Path(args.scratch), args.batch), "llava": lambda: llava(out, args.batch)}[name]()
        except Exception as err:  # noqa: BLE001 - recorded; the next model still runs
            import traceback

            traceback.print_exc()
            out[name] = {"error": f"{type(err).__name__}: {err}"}
        out["elapsed_s"] = time.perf_counter() - started
        write_json_atomic(target, out)
    for name in args.models.split(","):
        res = out.get(name, {})
        decode = res.get("decode") if isinstance(res.get("decode"), dict) else {}
        for section, rows in [(k, res.get(k)) for k in ("vision_kernels", "features_kernels")] + [
                (k, decode.get(k)) for k in ("prefill_kernels", "step_kernels")]:
            for row in rows if isinstance(rows, list) else []:
                print(name, section, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
