"""Quantization speed and memory at real scale (one GPU), or on the tiny fixtures (CPU). A benchmark, not a test.

    python scripts/bench_gpu.py --device cuda --check-reference --out benchmarks/gpu     # every target, ~5 min
    python scripts/bench_gpu.py --arch blip2-opt-2.7b --runs gptq:all --out /tmp/b     # one architecture
    python scripts/bench_gpu.py --arch tiny,tiny-llava --device cpu --out benchmarks/cpu

Architectures are built from their published sizes with random weights (std 0.02; speed does not
depend on values), fp16, with the tiny fixture's tokenizer and an image processor at the real
resolution: ``blip2-opt-2.7b`` (ViT-g 39x1408, Q-Former 12x768, OPT 32x2560), ``llava-1.5-7b`` (CLIP
ViT-L/14-336 24x1024, Vicuna-7B 32x4096) and ``llava-1.5-13b`` (the same tower, 40x5120). For every
(method, component) it restores the FP16 weights, runs `quantize` (W4 g128, 128 synthetic
calibration samples, the recipe defaults otherwise) and records wall time, the engine's own split
(calibration forwards, method, the report's statistics inside the method), block forwards, peak GPU
memory and its excess over the fp16 weights. ``--check-reference`` runs `gptq_reference.fasterquant`
(the readable loop) and the CUDA-graph path on one real-size layer and compares their codes, and
compares stacked q/k/v rows with one Linear at a time. The targets of issue 13 are evaluated at the
end. Results: ``<out>/bench_gpu.json`` (rewritten after every measurement, temp file + rename) and
``<out>/bench_gpu.md``.
"""

from __future__ import annotations

import argparse
import contextlib
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

# Issue 13's targets, evaluated on whatever was measured.
TARGETS = {
    "blip2_gptq_all_s": 15.0,  # GPTQ of all of BLIP-2 OPT-2.7B
    "awq_over_gptq": 1.5,  # AWQ all / GPTQ all wall time
    "llava7b_peak_above_weights_gib": 6.0,
    "llava13b_peak_gib": 40.0,
    "report_stats_share": 0.10,  # the report's statistics / method time, GPTQ
}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _write(path: Path, data: dict) -> None:
    from lmms_quant.atomic import write_json_atomic

    write_json_atomic(path, json.loads(json.dumps(data, default=str)), sort_keys=False)


def _write_text(path: Path, text: str) -> None:
    from lmms_quant.atomic import write_text_atomic

    write_text_atomic(path, text)


def _shapes_samples(n: int, seed: int):
    """Calibration samples straight from the shapes world (used where `datasets` is not installed)."""
    from lmms_quant.fixtures import shapes
    from lmms_quant.quant.calib_data import sample_from_text

    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(n):
        scene = shapes.make_scene(rng)
        out.append(sample_from_text(shapes.render(scene, 224), shapes.captions(scene)[0]))
    return out


def use_shapes_samples_without_datasets() -> str:
    """Where `datasets` is missing (the GPU box), the engine draws samples from the shapes world."""
    try:
        import datasets  # noqa: F401
        return "lmms_quant.fixtures calibration_samples"
    except ImportError:
        from lmms_quant.quant import api, calib_data

        api.load_samples = calib_data.load_samples = lambda source, n, seed: _shapes_samples(n, seed)
        return "shapes world (datasets not installed)"


def random_fp16(model_class, config, device):
    """``model_class(config)`` built in fp16 on ``device`` with std-0.02 random weights (sizes, not values, matter)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    return model


def build_blip2_opt_27b(device, llm_layers: int | None = None):
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
                              num_hidden_layers=llm_layers or 32, num_attention_heads=32, max_position_embeddings=2048,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id).to_dict(),
        num_query_tokens=32, image_token_index=image_token_id(tok),
    )
    model = random_fp16(Blip2ForConditionalGeneration, config, device)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 224, "width": 224}, image_mean=list(CLIP_MEAN),
                                           image_std=list(CLIP_STD), do_convert_rgb=True),
        tokenizer=tok, num_query_tokens=32)
    return model, processor


LLAVA_TEXT = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
              "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)}


def build_llava_15(device, size: str = "7b", llm_layers: int | None = None):
    """LLaVA-1.5 at its published sizes: CLIP ViT-L/14 at 336 px (576 image tokens), MLP projector, Vicuna."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from lmms_quant.fixtures.models import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE, image_token_id, lm_tokenizer

    tok = lm_tokenizer()
    text = dict(LLAVA_TEXT[size], **({"num_hidden_layers": llm_layers} if llm_layers else {}))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14,
                                       projection_dim=768).to_dict(),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, num_key_value_heads=None,
                                rms_norm_eps=1e-5,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, **text).to_dict(),
        image_token_index=image_token_id(tok), image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = random_fp16(LlavaForConditionalGeneration, config, device)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1)
    return model, processor


def build_llava_15_7b(device):
    """LLaVA-1.5-7B from its published sizes (CLIP ViT-L/14-336, 2-layer projector, Llama-2 7B), random fp16."""
    return build_llava_15(device, "7b")


def build_tiny(device, kind: str = "blip2_opt"):
    from lmms_quant.fixtures.models import FIXTURE_BUILDERS, FIXTURE_MODEL_CLASSES
    from transformers import AutoProcessor

    path = FIXTURE_BUILDERS[kind](Path(tempfile.mkdtemp()) / kind)
    return FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).to(device).eval(), AutoProcessor.from_pretrained(path)


ARCHS = {
    "blip2-opt-2.7b": (build_blip2_opt_27b, "gptq:all,awq:all,rtn:all,gptq:llm,gptq:vit"),
    "llava-1.5-7b": (lambda device, **kw: build_llava_15(device, "7b", **kw), "gptq:all,awq:llm"),
    "llava-1.5-13b": (lambda device, **kw: build_llava_15(device, "13b", **kw), "gptq:all"),
    "tiny": (build_tiny, "gptq:all,awq:all,rtn:all"),
    "tiny-llava": (lambda device: build_tiny(device, "llava"), "gptq:all,awq:all,rtn:all"),
}


def _relative_error(w, q, H) -> float:
    """tr(D H Dᵀ) / tr(W H Wᵀ) for D = W - Q."""
    delta = (w - q).double()
    return float(((delta @ H.double()) * delta).sum() / ((w.double() @ H.double()) * w.double()).sum())


def reference_check(device) -> dict:
    """The readable GPTQ loop against the fast path on real-size layers: the same codes?"""
    from lmms_quant.quant import gptq, gptq_kernel, gptq_torch_loop
    from lmms_quant.quant.gptq_reference import fasterquant
    from lmms_quant.quant.quantizer import QuantGrid

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        return result, time.perf_counter() - t0

    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=128)
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    rows, columns = (2560, 10240) if torch.device(device).type == "cuda" else (64, 256)
    x = torch.randn(8192, columns, device=device, generator=g, dtype=torch.float16).float()
    w = torch.randn(rows, columns, device=device, generator=g) * 0.02
    H = x.T @ x
    kernel_env = os.environ.get("LMMS_QUANT_GPTQ_KERNEL")

    def path(env: str, act_order: bool):
        """GPTQ of the layer by the Triton kernel ("1") or the graphed torch loop ("0"), the second call
        timed (compilation and graph capture happen in the first)."""
        os.environ["LMMS_QUANT_GPTQ_KERNEL"] = env
        try:
            timed(lambda: gptq.quantize_layer(w, H, grid, act_order=act_order))
            return timed(lambda: gptq.quantize_layer(w, H, grid, act_order=act_order))
        finally:
            if kernel_env is None:
                os.environ.pop("LMMS_QUANT_GPTQ_KERNEL")
            else:
                os.environ["LMMS_QUANT_GPTQ_KERNEL"] = kernel_env

    kernel_codes = {}
    for act_order in (True, False):
        (fast, fast_s), (graphed, graphed_s) = path("1", act_order), path("0", act_order)
        kernel_codes[act_order] = fast.codes
        ref, ref_s = timed(lambda a=act_order: fasterquant(w, H, grid, act_order=a))
        ist = fasterquant(w, H, grid, act_order=act_order, inverse_factor="ist")
        out[f"opt_fc2_{rows}x{columns}_act_order_{act_order}_ist_factor"] = {
            "codes_equal": "n/a (another factor)",
            "codes_mismatch_fraction": float((ist.codes != ref.codes).float().mean()),
            "relative_error_reversed_factor": _relative_error(w, ref.weight, H),
            "relative_error_ist_factor": _relative_error(w, ist.weight, H)}
        out[f"opt_fc2_{rows}x{columns}_act_order_{act_order}"] = {
            "codes_equal": bool(torch.equal(fast.codes, ref.codes)),
            "codes_mismatch_fraction": float((fast.codes != ref.codes).float().mean()),
            "weights_equal": bool(torch.equal(fast.weight, ref.weight)),
            "graphed_codes_equal": bool(torch.equal(graphed.codes, ref.codes)),
            "kernel_used": gptq_kernel.serves(w) and gptq_kernel._state["launched"],
            "fast_s": fast_s, "graphed_loop_s": graphed_s, "reference_s": ref_s,
            "graph_used": torch.device(device).type == "cuda" and not gptq_torch_loop.BlockLoop.graphs_disabled}
    if gptq_kernel.serves(w):  # the kernel's tile (block x rows per program) and warps: any gives the same codes
        sweep = {}
        for tile in (1024, 2048, 4096, 8192):
            for warps in (1, 2, 4, 8):
                os.environ.update(LMMS_QUANT_GPTQ_KERNEL_TILE=str(tile), LMMS_QUANT_GPTQ_KERNEL_WARPS=str(warps))
                try:
                    q, seconds = path("1", True)
                    sweep[f"tile_{tile}_warps_{warps}_s"] = {
                        "s": seconds, "codes_equal": bool(torch.equal(q.codes, kernel_codes[True]))}
                finally:
                    os.environ.pop("LMMS_QUANT_GPTQ_KERNEL_TILE")
                    os.environ.pop("LMMS_QUANT_GPTQ_KERNEL_WARPS")
        prefetch = {}
        for act_order in (True, False):  # the loads issued where they are used (the kernel's first form)
            os.environ["LMMS_QUANT_GPTQ_KERNEL_PREFETCH"] = "0"
            try:
                q, seconds = path("1", act_order)
            finally:
                os.environ.pop("LMMS_QUANT_GPTQ_KERNEL_PREFETCH")
            prefetch[act_order] = (bool(torch.equal(q.codes, kernel_codes[act_order])), seconds)
        out["kernel_loads_where_used"] = {
            "codes_equal": all(eq for eq, _ in prefetch.values()),
            "codes_mismatch_fraction": 0.0 if all(eq for eq, _ in prefetch.values()) else float("nan"),
            **{f"act_order_{a}_s": s_ for a, (_, s_) in prefetch.items()}}
        out["kernel_tile_sweep_act_order_True"] = {
            "codes_equal": all(c["codes_equal"] for c in sweep.values()), "codes_mismatch_fraction": 0.0 if all(
                c["codes_equal"] for c in sweep.values()) else float("nan"), **{k: c["s"] for k, c in sweep.items()}}
    from lmms_quant.quant.gptq_reference import ist_inverse_factor, reversed_inverse_factor

    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(columns, device=device)
    U_reversed, reversed_s = timed(lambda: reversed_inverse_factor(damped))
    U_ist, ist_s = timed(lambda: ist_inverse_factor(damped))
    out[f"inverse_factor_{columns}"] = {
        "codes_equal": "n/a", "codes_mismatch_fraction": float("nan"),
        "relative_difference": float((U_reversed - U_ist).norm() / U_ist.norm()),
        "reversed_s": reversed_s, "ist_s": ist_s}
    damped = U_reversed = U_ist = None  # 3 x 0.4 GiB, not needed by the checks below
    d = 4096 if torch.device(device).type == "cuda" else 128
    x = torch.randn(8192, d, device=device, generator=g, dtype=torch.float16).float()
    H = x.T @ x
    qkv = [torch.randn(d, d, device=device, generator=g) * 0.02 for _ in range(3)]
    stacked, stacked_s = timed(lambda: gptq.quantize_rows(torch.cat(qkv), H, grid, act_order=True).qweight)
    alone, alone_s = timed(lambda: [gptq.quantize_layer(w_, H, grid, act_order=True) for w_ in qkv])
    codes = torch.cat([a.codes for a in alone])
    out[f"llama_qkv_3x{d}x{d}_stacked_vs_alone"] = {
        "codes_equal": bool(torch.equal(stacked.codes, codes)),
        "codes_mismatch_fraction": float((stacked.codes != codes).float().mean()),
        "stacked_s": stacked_s, "one_at_a_time_s": alone_s}
    # The calibration Hessian of fp16 activations, float32 SIMT (the reference) vs TF32 tensor cores
    # (calibration.LayerStats.add): the sum's order differs, nothing else; what that does to the codes.
    from lmms_quant.quant.calibration import LayerStats

    x16 = torch.randn(5200, 11008 if torch.device(device).type == "cuda" else 256, device=device, generator=g,
                      dtype=torch.float16)
    def new_stats():
        return LayerStats(x16.shape[1], hessian=True, inputs=False, rows_per_batch=0, holdout_rows_per_batch=0, seed=0)

    new_stats().add(x16, "calib")  # the process's first call probes the half-precision product: not timed
    stats = new_stats()
    hessian_s = timed(lambda: stats.add(x16, "calib"))[1]
    h_tf32 = stats.hessian  # calibration's accumulation (`calibration.add_gram`)
    h_fp32, fp32_s = timed(lambda: x16.float().T @ x16.float())
    w = torch.randn(4096 if torch.device(device).type == "cuda" else 64, x16.shape[1], device=device, generator=g) * 0.02
    codes_tf32 = gptq.quantize_layer(w, h_tf32, grid, act_order=True).codes
    codes_fp32 = gptq.quantize_layer(w, h_fp32, grid, act_order=True).codes
    out[f"hessian_{x16.shape[0]}x{x16.shape[1]}_calibration_vs_fp32"] = {
        "relative_difference": float((h_tf32 - h_fp32).norm() / h_fp32.norm()),
        "codes_mismatch_fraction": float((codes_tf32 != codes_fp32).float().mean()),
        "accumulate_s": hessian_s, "fp32_s": fp32_s}
    # One OPT block's four groups (q/k/v stacked, out, fc1, fc2): interleaved on streams vs one by one.
    dm, df = (2560, 10240) if torch.device(device).type == "cuda" else (64, 256)
    xs = {c: torch.randn(8192, c, device=device, generator=g, dtype=torch.float16).float() for c in (dm, df)}
    hs = {c: x_.T @ x_ for c, x_ in xs.items()}
    shapes = [(3 * dm, dm), (dm, dm), (df, dm), (dm, df)]
    jobs = [dict(weight=torch.randn(r, c, device=device, generator=g) * 0.02, hessian=hs[c], grid=grid, act_order=True)
            for r, c in shapes]
    serial, serial_s = timed(lambda: [gptq.quantize_rows(**job) for job in jobs])
    # each group prepared on its own stream, the widest first, as `gptq.quantize_unit` does; the jobs
    # are taken by the runs, so the call gets copies of the dicts (the Hessians are not overwritten)
    widest = sorted(range(len(jobs)), key=lambda k: -shapes[k][1])
    together, together_s = timed(lambda: gptq.quantize_rows_concurrently([dict(jobs[k]) for k in widest], device))
    together = [together[widest.index(k)] for k in range(len(jobs))]
    mismatch = [float((a.qweight.codes != b.qweight.codes).float().mean()) for a, b in zip(serial, together)]
    out["opt_block_groups_concurrent_vs_serial"] = {
        "codes_equal": all(m == 0 for m in mismatch), "codes_mismatch_fraction": max(mismatch),
        "serial_s": serial_s, "concurrent_s": together_s}
    # The one-pass RTN error (`rtn_kernel`) against its torch reference: 20 AWQ candidates of an fc1,
    # the clip search's shrunk ranges, plain (GPTQ's report), symmetric and asymmetric.
    from lmms_quant.quant import rtn_kernel

    w = torch.randn(df, dm, device=device, generator=g) * 0.02
    scales = torch.rand(20, dm, device=device, generator=g) + 0.25
    clip = 0.55 + 0.45 * torch.rand(df, -(-dm // 128), device=device, generator=g)
    for sym in (False, True):
        grid_s = QuantGrid(bits=4, sym=sym, granularity="group", group_size=128)
        for name, kwargs in (("plain", {}), ("candidates_20", {"col_scale": scales}), ("clip", {"clip": clip}),
                             ("candidates_20_rounded", {"col_scale": scales, "rounded": True}),
                             ("clips_10", {"clip": torch.stack([clip * (1 - k / 20) for k in range(10)])})):
            rtn_kernel.rtn_delta(w, grid_s, **kwargs)  # compiles
            fast, fast_s = timed(lambda: rtn_kernel.rtn_delta(w, grid_s, **kwargs))
            ref, ref_s = timed(lambda: rtn_kernel.rtn_delta_reference(w, grid_s, **kwargs))
            out[f"rtn_delta_{df}x{dm}_{name}_sym_{sym}"] = {
                "codes_equal": bool(torch.equal(fast, ref)), "codes_mismatch_fraction": float((fast != ref).float().mean()),
                "kernel_used": rtn_kernel.serves(w, grid_s), "kernel_s": fast_s, "torch_s": ref_s}
            del fast, ref
    return out


def live_at_peak(snapshot: dict, top: int = 12) -> dict:
    """The allocations alive at the peak of a recorded memory history (those made while recording),
    summed by the innermost lmms_quant / transformers frame that made them."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot.get("device_traces", []):
        for event in trace:
            action = event.get("action")
            if action == "alloc":
                frames = event.get("frames") or []
                where = next((f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
                              if "lmms_quant" in f["filename"] or "model_wrappers" in f["filename"]
                              or "transformers" in f["filename"]), "?")
                live[event["addr"]] = (event["size"], where)
                total += event["size"]
                if total > peak:
                    peak, at_peak = total, dict(live)
            elif action == "free_requested" and event["addr"] in live:
                total -= live.pop(event["addr"])[0]
    by_site: dict[str, int] = {}
    for size, where in at_peak.values():
        by_site[where] = by_site.get(where, 0) + size
    rows = sorted(by_site.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_recorded_gib": peak / GIB, "by_site_gib": {k: v / GIB for k, v in rows}}


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaLaunchKernel", "cudaGraphLaunch")


def _profiler(device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def profile_summary(prof, wall_s: float, top: int = 15) -> dict:
    """What a profiled run spent: the device's busiest kernels, the host's busiest ops (self time), and
    how often the host called the runtime to wait, copy or launch. A device busy for much less than the
    wall time, with many synchronisations, is a run the host paces. Kernel times on concurrent streams
    add up, so ``device_kernel_s`` can exceed the wall time."""
    averages = prof.key_averages()

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", 0) or 0

    kernels = sorted((e for e in averages if device_us(e) > 0), key=device_us, reverse=True)
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_s": wall_s,
        "device_kernel_s": sum(device_us(e) for e in kernels) / 1e6,
        "host_self_s": sum(e.self_cpu_time_total for e in averages) / 1e6,
        "runtime_calls": {e.key: e.count for e in averages if e.key in HOST_WAITS},
        "top_device": [{"name": e.key[:160], "calls": e.count, "ms": device_us(e) / 1e3} for e in kernels[:top]],
        "top_host_self": [{"name": e.key[:160], "calls": e.count, "ms": e.self_cpu_time_total / 1e3}
                          for e in host[:top]],
        # the engine's named spans (`record_function("lmms_quant.…")`): host time inclusive of what they
        # call, and the device time of the kernels launched inside them
        "spans": [{"name": e.key, "calls": e.count, "host_ms": e.cpu_time_total / 1e3,
                   "device_ms": (getattr(e, "device_time_total", 0) or 0) / 1e3}
                  for e in sorted(averages, key=lambda e: e.cpu_time_total, reverse=True)
                  if e.key.startswith("lmms_quant.")],
    }


def run_arch(arch: str, args, result: dict, out_path: Path, started: float) -> None:
    from lmms_quant.quant import Recipe, quantize

    device = args.device
    t0 = time.perf_counter()
    model, processor = ARCHS[arch][0](device, **({"llm_layers": args.llm_layers} if args.llm_layers else {}))
    _sync(device)
    entry = {"arch": arch, "build_s": time.perf_counter() - t0, "runs": [], "llm_layers": args.llm_layers,
             "fp16_weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB}
    result["archs"].append(entry)
    runs = (args.runs or ARCHS[arch][1]).split(",")
    keep = len(runs) > 1 or args.warmup or args.compare_eager or args.sync_debug
    pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if keep else None
    _write(out_path, result)

    def recipe_of(spec: str) -> Recipe:
        method, component = spec.split(":")
        return Recipe.parse({"method": method, "component": component, "bits": 4, "group_size": 128,
                             "calib_n": args.calib_n, "calib_batch_size": args.calib_batch_size})

    if args.warmup:  # the process's first quantization pays one-time costs (kernel compiles, library set-up)
        entry["warmups"] = []
        for spec in (args.warmup_runs or runs[0]).split(","):
            model.load_state_dict(pristine)
            entry["warmups"].append({"spec": spec, "wall_s": timed_quantize(model, processor, recipe_of(spec), device)[1]})
            print(arch, "warm-up", json.dumps(entry["warmups"][-1]), flush=True)
        entry["warmup"] = entry["warmups"][0]
    for index, spec in enumerate(runs):
        if time.perf_counter() - started > args.deadline_s:
            entry.setdefault("not_run", []).append(spec)
            continue
        method, component = spec.split(":")
        if index or args.warmup:
            model.load_state_dict(pristine)
        recipe = recipe_of(spec)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        if args.memory_trace:
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, context="alloc", stacks="python")
        profiler = _profiler(device) if args.profile else contextlib.nullcontext()
        with profiler:
            report = quantize(model, processor, recipe, device=device, progress=False)
            _sync(device)
        wall = time.perf_counter() - t0
        trace = None
        if args.memory_trace:
            trace = live_at_peak(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
        timing = report.timing
        run = {"method": method, "component": component, "wall_s": wall,
               "calibration_s": timing.get("calibration_s"), "method_s": timing.get("method_s"),
               "report_stats_s": timing.get("report_stats_s"), "method_phases_s": timing.get("method_phases_s"),
               "driver": timing.get("driver"), "batches_s": timing.get("batches_s"),
               "calibration_capture_s": timing.get("calibration_capture_s"),
               "calibration_next_inputs_s": timing.get("calibration_next_inputs_s"),
               "host_steps_s": timing.get("host_steps_s"),
               "block_forwards": timing.get("block_forwards"), "capture_passes": timing.get("capture_passes"),
               "model_driver_stacks": timing.get("model_driver_stacks"), "units": timing.get("units"),
               "linears": len(report.tensors), "holdout_samples": report.calibration["holdout_samples"],
               "mean_output_error": sum(t.output_error or 0 for t in report.tensors) / max(1, len(report.tensors))}
        if run["method_s"]:
            run["report_stats_share"] = (run["report_stats_s"] or 0) / run["method_s"]
        if torch.device(device).type == "cuda":
            run["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
            run["peak_above_weights_gib"] = run["peak_gpu_gib"] - entry["fp16_weights_gib"]
        if trace is not None:
            run["memory_trace"] = trace  # recording slows the run: its times are not comparable
        if args.profile:
            run["profile"] = profile_summary(profiler, wall)  # so does profiling
        if method == "awq":
            from lmms_quant.quant.awq_parent import CAPTURE_FAILURES
            from lmms_quant.quant.awq_scoring import FACTOR_SHIFTS

            run["awq_capture_failures"] = dict(CAPTURE_FAILURES)
            run["awq_factor_shifts"] = {str(k): v for k, v in FACTOR_SHIFTS.items()}  # since the process began
        if args.sync_debug and torch.device(device).type == "cuda":
            model.load_state_dict(pristine)
            run["syncs"] = count_syncs(model, processor, recipe, device)
        if args.compare_eager and method == "awq":
            run["eager"] = compare_eager(model, processor, recipe, pristine, report, device)
        entry["runs"].append(run)
        print(arch, json.dumps(run), flush=True)
        _write(out_path, result)
    del model, pristine
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def count_syncs(model, processor, recipe, device, top: int = 15) -> dict:
    """The run again (untimed) with torch's CUDA sync debugging on: each operation that made the host
    wait for the device, counted by the innermost lmms_quant (else transformers) line that called it.
    A host that waits inside a unit cannot queue the next block's work ahead of the device."""
    import traceback
    import warnings

    from lmms_quant.quant import quantize

    sites: dict[str, int] = {}

    def seen(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        frame = next((f for f in reversed(stack) if "/lmms_quant/" in f.filename), None) or next(
            (f for f in reversed(stack) if "/transformers/" in f.filename), stack[-1])
        site = f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno} {frame.name}"
        sites[site] = sites.get(site, 0) + 1

    shown = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = seen
            torch.cuda.set_sync_debug_mode("warn")
            report = quantize(model, processor, recipe, device=device, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    _sync(device)
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])
    return {"total": sum(sites.values()), "units": report.timing.get("units"), "by_site": dict(ranked[:top])}


def timed_quantize(model, processor, recipe, device):
    """(report, wall seconds) of one quantization, the device idle before and after."""
    from lmms_quant.quant import quantize

    _sync(device)
    t0 = time.perf_counter()
    report = quantize(model, processor, recipe, device=device, progress=False)
    _sync(device)
    return report, time.perf_counter() - t0


def compare_eager(model, processor, recipe, pristine, graphed, device) -> dict:
    """The same AWQ run with its parent searches replayed eagerly (`awq_parent`, no CUDA graphs): its
    time, and whether every fold chose the same scale with the same search losses."""
    from lmms_quant.quant.awq_parent import GRAPHS_ENV

    model.load_state_dict(pristine)
    previous = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = "0"
    try:
        eager, wall = timed_quantize(model, processor, recipe, device)
    finally:
        if previous is None:
            os.environ.pop(GRAPHS_ENV)
        else:
            os.environ[GRAPHS_ENV] = previous
    pairs = list(zip(graphed.folds, eager.folds))
    searched = [(g, e) for g, e in pairs if "losses" in g and "losses" in e]
    loss_gap = max((abs(a - b) / max(abs(b), 1e-30) for g, e in searched for a, b in zip(g["losses"], e["losses"])),
                   default=0.0)
    return {"wall_s": wall, "method_s": eager.timing.get("method_s"), "folds": len(pairs),
            "parent_searches": len(searched),
            "same_alpha": sum(g["alpha"] == e["alpha"] for g, e in pairs),
            "max_relative_loss_difference": loss_gap,
            "mean_output_error": sum(t.output_error or 0 for t in eager.tensors) / max(1, len(eager.tensors))}


def evaluate_targets(result: dict) -> list[dict]:
    def runs(arch):
        return {f"{r['method']}:{r['component']}": r for a in result["archs"] if a["arch"] == arch for r in a["runs"]}

    checks = []
    blip2 = runs("blip2-opt-2.7b")
    if "gptq:all" in blip2:
        checks.append({"target": "BLIP-2 OPT-2.7B, GPTQ all < 15 s", "measured": blip2["gptq:all"]["wall_s"],
                       "met": blip2["gptq:all"]["wall_s"] < TARGETS["blip2_gptq_all_s"]})
        if "awq:all" in blip2:
            ratio = blip2["awq:all"]["wall_s"] / blip2["gptq:all"]["wall_s"]
            checks.append({"target": "BLIP-2 AWQ all <= 1.5 x GPTQ all", "measured": ratio,
                           "met": ratio <= TARGETS["awq_over_gptq"]})
    llava7 = runs("llava-1.5-7b")
    for method in ("gptq", "awq"):
        peaks = [r["peak_above_weights_gib"] for r in llava7.values()
                 if "peak_above_weights_gib" in r and r["method"] == method]
        if peaks:
            checks.append({"target": f"LLaVA-1.5-7B {method.upper()} peak <= fp16 weights + 6 GiB",
                           "measured": max(peaks), "met": max(peaks) <= TARGETS["llava7b_peak_above_weights_gib"]})
    llava13 = runs("llava-1.5-13b")
    peaks = [r["peak_gpu_gib"] for r in llava13.values() if "peak_gpu_gib" in r]
    if peaks:
        checks.append({"target": "LLaVA-1.5-13B shape, peak < 40 GiB", "measured": max(peaks),
                       "met": max(peaks) < TARGETS["llava13b_peak_gib"]})
    shares = [r["report_stats_share"] for a in result["archs"] for r in a["runs"]
              if r["method"] == "gptq" and r.get("report_stats_share") is not None]
    if shares:
        checks.append({"target": "GPTQ: report statistics <= 10 % of method time", "measured": max(shares),
                       "met": max(shares) <= TARGETS["report_stats_share"]})
    return checks


def markdown(result: dict) -> str:
    lines = [f"# bench_gpu: {result['card']}, torch {result['torch']}, transformers {result['transformers']}",
             "", f"`{result['command']}` ({result['date']}); W4 g128 asymmetric, {result['calib_n']} calibration "
             f"samples, batch {result['calib_batch_size']}; samples: {result['calib_samples_from']}.", "",
             "| arch | method : component | wall s | calibration s | method s | report stats s | block fwd | "
             "peak GiB | peak - fp16 weights GiB | mean held-out layer error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for arch in result["archs"]:
        for r in arch["runs"]:
            lines.append(f"| {arch['arch']} | {r['method']} : {r['component']} | {fmt(r['wall_s'])} | "
                         f"{fmt(r['calibration_s'])} | {fmt(r['method_s'])} | {fmt(r['report_stats_s'])} | "
                         f"{fmt(r['block_forwards'])} | {fmt(r.get('peak_gpu_gib'))} | "
                         f"{fmt(r.get('peak_above_weights_gib'))} | {fmt(r['mean_output_error'], 4)} |")
        if arch.get("warmup"):
            lines.append(f"| {arch['arch']} | {arch['warmup']['spec']}, cold (warm-up, first of the process) | "
                         f"{fmt(arch['warmup']['wall_s'])} | | | | | | | |")
        for spec in arch.get("not_run", []):
            lines.append(f"| {arch['arch']} | {spec} | not run (deadline) | | | | | | | |")
    for arch in result["archs"]:
        for r in arch["runs"]:
            if "profile" in r:
                p = r["profile"]
                calls = ", ".join(f"{k} {v}" for k, v in p["runtime_calls"].items())
                kernels = "; ".join(f"{k['name'][:60]} {k['ms']:.0f} ms" for k in p["top_device"][:5])
                lines += ["", f"Profile, {arch['arch']} {r['method']}:{r['component']} (profiled: times not "
                          f"comparable): wall {p['wall_s']:.2f} s, device kernels {p['device_kernel_s']:.2f} s, "
                          f"host self {p['host_self_s']:.2f} s; runtime calls: {calls or 'none'}; "
                          f"top kernels: {kernels or 'none'}."]
    if result.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['measured']:.3f} | {'yes' if c['met'] else 'NO'} |" for c in result["targets"]]
    if result.get("reference_check"):
        lines += ["", "| reference check | codes equal | mismatch fraction | times s |", "|---|---|---|---|"]
        for name, c in result["reference_check"].items():
            times = ", ".join([f"{k} {v:.3f}" for k, v in c.items() if k.endswith("_s")]
                              + [f"{k} {v:.5f}" for k, v in c.items() if k.startswith("relative_error")])
            equal = c.get("codes_equal", f"relative H difference {c.get('relative_difference', float('nan')):.1e}")
            lines.append(f"| {name} | {equal} | {c['codes_mismatch_fraction']:.2e} | {times} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help=f"comma-separated, of {', '.join(ARCHS)} "
                        "[cuda: blip2-opt-2.7b,llava-1.5-7b,llava-1.5-13b; cpu: tiny,tiny-llava]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--runs", default=None, help="comma-separated method:component pairs [per arch]")
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no new run after this many seconds")
    parser.add_argument("--memory-trace", action="store_true",
                        help="record CUDA allocations: what is alive at each run's peak, by source line (slow)")
    parser.add_argument("--check-reference", action="store_true", help="gptq_reference vs the fast path, real size")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="build the LLM with this many blocks (real width; for memory traces and profiles: the "
                             "per-block peak and time of the full depth, in a fraction of the run) [the real depth]")
    parser.add_argument("--warmup", action="store_true",
                        help="run each arch's first method:component once, untimed, before the timed runs "
                             "(its wall time is reported as the cold run)")
    parser.add_argument("--warmup-runs", default=None,
                        help="with --warmup: the specs quantized once, untimed, first (default: the first of --runs); "
                             "e.g. gptq:all,awq:all, so that neither method's timed run pays one-time set-up")
    parser.add_argument("--compare-eager", action="store_true",
                        help="after each AWQ run, the same run with its parent searches replayed eagerly (no CUDA "
                             "graphs): its time, and whether every fold chose the same scale with the same losses")
    parser.add_argument("--sync-debug", action="store_true",
                        help="after each timed run, the run again with CUDA sync debugging: where the host "
                             "waited for the device, by source line (slows that run; untimed)")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over each run: top device kernels and host ops, runtime waits "
                             "(slows the run)")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    archs = (args.arch or ("blip2-opt-2.7b,llava-1.5-7b,llava-1.5-13b" if cuda else "tiny,tiny-llava")).split(",")
    for arch in archs:
        if arch not in ARCHS:
            parser.error(f"--arch: got {arch!r}; valid: {', '.join(ARCHS)}")
        if args.llm_layers is not None and (arch.startswith("tiny") or args.llm_layers < 1):
            parser.error(f"--llm-layers: got {args.llm_layers} for {arch}; valid: a positive depth, for the "
                         f"real-size archs ({', '.join(a for a in ARCHS if not a.startswith('tiny'))})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    import transformers

    result = {
        "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv), "calib_n": args.calib_n, "calib_batch_size": args.calib_batch_size,
        "calib_samples_from": use_shapes_samples_without_datasets(), "archs": [],
    }
    out_path = args.out / "bench_gpu.json"
    if args.check_reference:
        result["reference_check"] = reference_check(args.device)
        print("reference check", json.dumps(result["reference_check"]), flush=True)
        _write(out_path, result)
    for arch in archs:
        if time.perf_counter() - started > args.deadline_s:
            result.setdefault("not_run", []).append(arch)
            continue
        run_arch(arch, args, result, out_path, started)
        # a truncated LLM is not the model the targets are about
        result["targets"] = evaluate_targets(result) if args.llm_layers is None else []
        _write(out_path, result)
        _write_text(args.out / "bench_gpu.md", markdown(result))
    result["total_s"] = time.perf_counter() - started
    _write(out_path, result)
    _write_text(args.out / "bench_gpu.md", markdown(result))
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
