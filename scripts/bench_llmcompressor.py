"""Our GPTQ against llm-compressor's GPTQ on the same Linears, samples, bits and group size. A benchmark, not a test.

    python scripts/bench_llmcompressor.py --out /tmp/out                  # everything, one H200, ~6-8 min
    python scripts/bench_llmcompressor.py --arch tiny,tiny-llava --device cpu --group-size 32 --out /tmp/bench

Parts: BLIP-2 OPT-2.7B ViT and LLM, LLaVA-1.5-7B LLM (real-size configs built in code, random
weights, fp16; `bench_gpu`'s builders). Per part and per act-order setting (static act-order on, and
off): restore the FP16 weights, run ``quantize`` (method gptq, ``report_holdout=0``: no held-out
report passes, llm-compressor has none), measure; rebuild, run llm-compressor's ``oneshot`` with a
``GPTQModifier`` of the same grid (bits, group size, asymmetric, damping 0.01, block 128) and
``actorder`` given to the modifier itself (``"static"`` or ``None``: inside the weights dict a
None means "unset", and the modifier's default, static act-order, applies — the mistake of the
first version of this script), measure. Wall time and peak GPU memory for both. Both see the same
128 calibration samples, encoded the same way (``make_batches``, batch 8), and are scored on the
same 32 held-out samples with the same two errors, taken from the model as it then runs
(llm-compressor's fake-quant forward included):

- ``layer_output_error``: per quantized Linear, ‖y − x·W_fpᵀ‖ / ‖x·W_fpᵀ‖ over the held-out tokens
  (x: the Linear's input in the quantized model, y: its output), averaged over the Linears;
- ``logits_error``: ‖logits − logits_fp‖ / ‖logits_fp‖ of the whole model on the held-out batches.
Padding positions are left out of both (as calibration leaves them out of our Hessians).
With ``--warmup`` each library first quantizes each part once per act-order setting, untimed (its cold
runs, reported apart):
otherwise whichever runs first in the process pays the one-time kernel set-up of that part's shapes
(cuBLAS, attention, Triton compiles) that the other then finds ready.

llm-compressor drives BLIP-2's ViT with its sequential pipeline on ``model.vision_model`` (layer by
layer, like ours) and the LLMs with its basic pipeline on the whole model (its sequential pipeline
cannot trace the multimodal wrappers, see /work/shared/notes/quantization.md §3.1), so for the LLMs
its Hessians come from the FP model while ours see the already-quantized earlier blocks.
Results: ``<out>/bench_llmcompressor.json`` (temp file + rename, after every run and every 5 s while
one is in progress) and ``<out>/bench_llmcompressor.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_gpu import (GIB, _shapes_samples, _sync, _write, _write_text, build_blip2_opt_27b, build_llava_15,  # noqa: E402
                       build_tiny)

# arch -> (builder, prompt style, component -> prefix of its Linears (llm-compressor's regex ``ignore``))
ARCHS = {
    "blip2-opt-2.7b": (build_blip2_opt_27b, "blip2_causal", {"vit": "vision_model.", "llm": "language_model."}),
    "llava-1.5-7b": (lambda device: build_llava_15(device, "7b"), "llava", {"llm": "model.language_model."}),
    "tiny": (build_tiny, "blip2_causal", {"vit": "vision_model.", "llm": "language_model."}),
    "tiny-llava": (lambda device: build_tiny(device, "llava"), "llava", {"llm": "model.language_model."}),
}
HOLDOUT = 32


class Recorder:
    """The result dict, written atomically now and then, with the run in progress and its elapsed time."""

    def __init__(self, path: Path, result: dict):
        self.path, self.result, self.lock = path, result, threading.Lock()
        self.current = None
        self.stop = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self):
        while not self.stop.wait(5.0):
            self.write()

    def write(self):
        with self.lock:
            if self.current:
                name, t0 = self.current
                self.result["in_progress"] = {"run": name, "elapsed_s": time.perf_counter() - t0}
            else:
                self.result.pop("in_progress", None)
            _write(self.path, self.result)

    @contextlib.contextmanager
    def running(self, name: str):
        with self.lock:
            self.current = (name, time.perf_counter())
        self.write()
        try:
            yield
        finally:
            with self.lock:
                self.current = None


def linear_names(model, prefix: str) -> list[str]:
    """The Linears llm-compressor targets for a component: every Linear under its prefix but lm_head."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and not n.endswith("lm_head")]


@torch.no_grad()
def score(model, names: list[str], fp_weights: dict, holdout, fp_logits, device) -> dict:
    """Held-out errors of the model as it runs now: per-Linear output error and whole-model logits error."""
    modules = dict(model.named_modules())
    sums = {n: [0.0, 0.0] for n in names}
    current = {"mask": None}

    def real_tokens(t):
        # padding is left out, as in calibration; OPT flattens (batch, seq) before its feed-forward
        mask = current["mask"]
        if mask is None:
            return t
        if tuple(t.shape[:-1]) == tuple(mask.shape) or (t.dim() == 2 and t.shape[0] == mask.numel()):
            return t.reshape(-1, t.shape[-1])[mask.reshape(-1)]
        return t

    def hook(name):
        def fn(module, args, output):
            x, output = real_tokens(args[0]), real_tokens(output)
            ref = F.linear(x, fp_weights[name].to(x.dtype), None if module.bias is None else module.bias.to(x.dtype))
            sums[name][0] += float((output.float() - ref.float()).pow(2).sum())
            sums[name][1] += float(ref.float().pow(2).sum())
        return fn

    fp_weights = {n: w.to(device) for n, w in fp_weights.items()}  # held on the CPU between scorings
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    diff = ref_norm = 0.0
    try:
        for batch, ref_logits in zip(holdout, fp_logits):
            mask = batch.masks.get("attention_mask")
            current["mask"] = None if mask is None else mask.to(device)
            logits = real_tokens(model(**batch.to(device, model.dtype)).logits).float()
            ref_logits = real_tokens(ref_logits.to(device)).float()
            diff += float((logits - ref_logits).pow(2).sum())
            ref_norm += float(ref_logits.pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    per_layer = [(d / r) ** 0.5 for d, r in sums.values() if r > 0]
    return {"layer_output_error": sum(per_layer) / len(per_layer), "layers_scored": len(per_layer),
            "logits_error": (diff / ref_norm) ** 0.5}


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    return torch.cuda.max_memory_allocated() / GIB if torch.device(device).type == "cuda" else None


def run_ours(model, processor, samples, component, act_order, args, device):
    from lmms_quant.quant import Recipe, api, calib_data, quantize

    api.load_samples = calib_data.load_samples = lambda source, n, seed: samples[:n]
    recipe = Recipe.parse({"method": "gptq", "component": component, "bits": args.bits, "group_size": args.group_size,
                           "calib_n": args.calib_n, "calib_batch_size": args.calib_batch_size, "damp": args.damp,
                           "act_order": act_order, "report_holdout": 0})
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    report = quantize(model, processor, recipe, device=device, progress=False)
    _sync(device)
    wall = time.perf_counter() - t0
    timing = {k: report.timing.get(k) for k in ("calibration_s", "method_s", "report_stats_s", "block_forwards",
                                                "batches_s", "calibration_capture_s", "calibration_next_inputs_s",
                                                "method_phases_s", "host_steps_s")}
    return {"wall_s": wall, "peak_gpu_gib": _peak(device), **timing}, sorted(t.name for t in report.tensors)


def run_llmcompressor(model, processor, calib_batches, component, prefix, act_order, args, device, workdir: Path):
    from torch.utils.data import DataLoader

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size}
    if component == "vit":
        target = model.vision_model
        rows = [{"pixel_values": b.inputs["pixel_values"].to(device, model.dtype)} for b in calib_batches]
        ignore, pipeline, extra = [], "sequential", {"sequential_targets": ["Blip2EncoderLayer"]}
    else:
        target = model
        # its pipeline moves only tensors, so the batch's non-tensor options (use_cache=False) stay out
        rows = [{k: v for k, v in b.to(device, model.dtype).items() if isinstance(v, torch.Tensor)}
                for b in calib_batches]
        ignore = [f"re:^(?!{prefix.replace('.', '[.]')}).*", "re:.*lm_head"]
        pipeline, extra = "basic", {}
    # oneshot validates name_or_path as a local dir or hub id; a model built from a config has none.
    config_dir = workdir / f"config_{component}"
    target.config.save_pretrained(config_dir)
    target.config._name_or_path = str(config_dir)
    # actorder on the modifier itself: None there switches act-order off; "static" is its default.
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=ignore,
                          dampening_frac=args.damp, block_size=128, actorder="static" if act_order else None)
    loader = DataLoader(rows, batch_size=None, shuffle=False)
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    oneshot(model=target, processor=processor, dataset=loader, recipe=recipe, pipeline=pipeline,
            num_calibration_samples=args.calib_n, **extra)
    _sync(device)
    return {"wall_s": time.perf_counter() - t0, "peak_gpu_gib": _peak(device),
            "pipeline": "sequential (vision_model)" if component == "vit" else "basic",
            "actorder_resolved": _resolved_actorder(target, prefix if component != "vit" else "")}


def fresh_model(builder, pristine: dict, device):
    """A newly built model holding the FP16 weights (after llm-compressor, whose state stays on the
    modules of the one it ran on: the caller has dropped its reference to that one)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    model, processor = builder(device)
    model.load_state_dict(pristine)
    return model, processor


def _resolved_actorder(model, prefix: str):
    """What llm-compressor's quantization scheme on a targeted Linear says about act-order."""
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and name.startswith(prefix) and getattr(scheme, "weights", None) is not None:
            value = scheme.weights.actorder
            return None if value is None else str(getattr(value, "value", value))
    return "no quantized module found"


def markdown(result: dict) -> str:
    lines = [f"# Our GPTQ vs llm-compressor {result['llmcompressor']} — {result['card']}", "",
             f"`{result['command']}` ({result['date']}); torch {result['torch']}, transformers "
             f"{result['transformers']}; W{result['grid']['bits']} g{result['grid']['group_size']} asymmetric, "
             f"damp {result['grid']['damp']}, block 128; {result['calib_samples']} calibration samples (batch "
             f"{result['calib_batch_size']}), errors on {HOLDOUT} held-out samples.", "",
             "| part | Linears | act-order | ours s | llm-c s | ours peak GiB | llm-c peak GiB | ours layer err | "
             "llm-c layer err | ours logits err | llm-c logits err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for e in result["runs"]:
        o, c = e.get("ours", {}), e.get("llmcompressor", {})
        lines.append(f"| {e['arch']} {e['component']} | {e['linears']} | {'static' if e['act_order'] else 'off'} | "
                     f"{fmt(o.get('wall_s'), 1)} | {fmt(c.get('wall_s'), 1)} | {fmt(o.get('peak_gpu_gib'))} | "
                     f"{fmt(c.get('peak_gpu_gib'))} | {fmt(o.get('layer_output_error'), 5)} | "
                     f"{fmt(c.get('layer_output_error'), 5)} | {fmt(o.get('logits_error'), 5)} | "
                     f"{fmt(c.get('logits_error'), 5)} |")
    for name in result.get("not_run", []):
        lines.append(f"| {name} | | | not run (deadline) | | | | | | | |")
    for w in result.get("warmup", []):
        lines.append(f"\nWarm-up of {w['arch']} {w['component']} (act-order {'static' if w['act_order'] else 'off'}, "
                     f"untimed in the table): ours {w['ours_wall_s']:.1f} s, llm-c {w['llmcompressor_wall_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=None, help=f"comma-separated, of {', '.join(ARCHS)} "
                        "[cuda: blip2-opt-2.7b,llava-1.5-7b; cpu: tiny,tiny-llava]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--components", default=None, help="comma-separated subset of each arch's parts (vit, llm)")
    parser.add_argument("--act-order", default="on,off", help="comma-separated: on, off")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="must divide every in_features (tiny: 32)")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--warmup", action="store_true",
                        help="per part, run each library once untimed first (reported as its cold run): the timed "
                             "runs then measure both warm, and neither profits from kernel set-up the other paid")
    parser.add_argument("--deadline-s", type=float, default=450,
                        help="start no new run after this many s [450: the whole call fits in ~8 minutes]")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    archs = (args.arch or ("blip2-opt-2.7b,llava-1.5-7b" if cuda else "tiny,tiny-llava")).split(",")
    for arch in archs:
        if arch not in ARCHS:
            parser.error(f"--arch: got {arch!r}; valid: {', '.join(ARCHS)}")
    orders = [{"on": True, "off": False}[o] for o in args.act_order.split(",")] if args.act_order else []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    import compressed_tensors
    import llmcompressor
    import transformers

    from lmms_quant.quant.calib_data import make_batches

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": args.device,
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "grid": {"bits": args.bits, "group_size": args.group_size, "sym": False, "damp": args.damp, "block_size": 128},
        "calib_samples": args.calib_n, "calib_batch_size": args.calib_batch_size, "holdout_samples": HOLDOUT,
        "calib_samples_from": "shapes world (lmms_quant.fixtures.shapes), the same list for both", "runs": [],
    }
    out = args.out
    recorder = Recorder(out / "bench_llmcompressor.json", result)
    workdir = Path(tempfile.mkdtemp(prefix="bench_llmc_"))
    samples = _shapes_samples(args.calib_n + HOLDOUT, seed=0)

    for arch in archs:
        builder, style, parts = ARCHS[arch]
        components = [c for c in (args.components.split(",") if args.components else parts) if c in parts]
        t0 = time.perf_counter()
        model, processor = builder(args.device)
        result.setdefault("build_s", {})[arch] = time.perf_counter() - t0
        result.setdefault("fp16_weights_gib", {})[arch] = sum(p.numel() * p.element_size()
                                                              for p in model.parameters()) / GIB
        pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        calib_batches = make_batches(processor, style, samples[:args.calib_n], args.calib_batch_size)
        holdout = make_batches(processor, style, samples[args.calib_n:], args.calib_batch_size)
        with torch.no_grad():
            fp_logits = [model(**b.to(args.device, model.dtype)).logits.to("cpu") for b in holdout]
        recorder.write()
        for component in components:
            # Each act-order setting warmed apart: they are different kernel specialisations (our column
            # loop compiles one per setting; a cold one cost our first "off" run 1.5-2 s in run 9).
            for warm_order in (orders if args.warmup else []):
                if time.perf_counter() - started > args.deadline_s:
                    break
                cold = {"arch": arch, "component": component, "act_order": warm_order}
                with recorder.running(f"warm-up ours {arch} {component}"):
                    cold["ours_wall_s"] = run_ours(model, processor, samples, component, warm_order, args,
                                                   args.device)[0]["wall_s"]
                model.load_state_dict(pristine)
                with recorder.running(f"warm-up llmcompressor {arch} {component}"):
                    cold["llmcompressor_wall_s"] = run_llmcompressor(
                        model, processor, calib_batches, component, parts[component], warm_order, args, args.device,
                        workdir)["wall_s"]
                result.setdefault("warmup", []).append(cold)
                print("warm-up", json.dumps(cold), flush=True)
                recorder.write()
                del model
                model, processor = fresh_model(builder, pristine, args.device)
            for act_order in orders:
                name = f"{arch} {component} act_order={'static' if act_order else 'off'}"
                if time.perf_counter() - started > args.deadline_s:
                    result.setdefault("not_run", []).append(name)
                    recorder.write()
                    continue
                names = linear_names(model, parts[component])
                fp_weights = {n: pristine[f"{n}.weight"] for n in names}
                entry = {"arch": arch, "component": component, "act_order": act_order, "linears": len(names)}
                result["runs"].append(entry)
                with recorder.running(f"ours {name}"):
                    ours, ours_names = run_ours(model, processor, samples, component, act_order, args, args.device)
                entry["ours"] = {**ours, **score(model, names, fp_weights, holdout, fp_logits, args.device)}
                entry["same_linears"] = ours_names == sorted(names)
                print(json.dumps(entry), flush=True)
                recorder.write()

                model.load_state_dict(pristine)  # our engine leaves nothing on the modules but their weights
                with recorder.running(f"llmcompressor {name}"):
                    llmc = run_llmcompressor(model, processor, calib_batches, component, parts[component], act_order,
                                             args, args.device, workdir)
                entry["llmcompressor"] = {**llmc, **score(model, names, fp_weights, holdout, fp_logits, args.device)}
                entry["time_ratio_llmcompressor_over_ours"] = llmc["wall_s"] / entry["ours"]["wall_s"]
                print(json.dumps(entry), flush=True)
                recorder.write()
                _write_text(out / "bench_llmcompressor.md", markdown(result))
                # llm-compressor leaves its quantization state on the modules: the next run gets a fresh model.
                del model
                model, processor = fresh_model(builder, pristine, args.device)
        del model, pristine, fp_logits
        if cuda:
            torch.cuda.empty_cache()

    recorder.stop.set()
    result["total_s"] = time.perf_counter() - started
    recorder.write()
    _write_text(out / "bench_llmcompressor.md", markdown(result))
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
