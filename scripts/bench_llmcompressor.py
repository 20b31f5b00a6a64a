"""Our GPTQ against llm-compressor's GPTQ on the same Linears, samples, bits and group size. A benchmark, not a test.

    python scripts/bench_llmcompressor.py --arch blip2-opt-2.7b --device cuda --out benchmarks --deadline-s 170
    python scripts/bench_llmcompressor.py --arch tiny --device cpu --group-size 32 --out /tmp/bench

Per component (``vit``, ``llm``): restore the FP16 weights, run ``quantize`` (method gptq), measure;
restore again, run llm-compressor's ``oneshot`` with a ``GPTQModifier`` of the same grid (bits, group
size, asymmetric, damping 0.01, block 128, no act-order), measure. Both see the same 128 calibration
samples, encoded the same way (``make_batches``, batch 8); both are scored on the same 32 held-out
samples with the same two errors, taken from the model as it then runs (llm-compressor's fake-quant
forward included):

- ``layer_output_error``: per quantized Linear, ‖y − x·W_fpᵀ‖ / ‖x·W_fpᵀ‖ over the held-out tokens
  (x: the Linear's input in the quantized model, y: its output), averaged over the Linears;
- ``logits_error``: ‖logits − logits_fp‖ / ‖logits_fp‖ of the whole model on the held-out batches.
Padding positions are left out of both (as calibration leaves them out of our Hessians).

llm-compressor drives the ViT with its sequential pipeline on ``model.vision_model`` (layer by layer,
like ours) and the LLM with its basic pipeline on the whole model (its sequential pipeline cannot
trace the BLIP-2 wrapper, see /work/shared/notes/quantization.md §3.1), so for the LLM its Hessians
come from the FP model while ours see the already-quantized earlier blocks.
Results go to ``<out>/bench_llmcompressor_<arch>.json`` (temp file + rename) after every run, and
every 5 s while one is in progress, so a run cut short by a time limit still shows how long it had taken.
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

from bench_gpu import _shapes_samples, _sync, _write, build_blip2_opt_27b, build_tiny  # noqa: E402

# Which top-level module holds each component, for llm-compressor's regex ``ignore``.
COMPONENT_PREFIX = {"vit": "vision_model.", "llm": "language_model."}


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


def linear_names(model, component: str) -> list[str]:
    """The Linears llm-compressor targets for ``component``: every Linear under its prefix but lm_head."""
    prefix = COMPONENT_PREFIX[component]
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

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    diff = ref_norm = 0.0
    try:
        for batch, ref_logits in zip(holdout, fp_logits):
            mask = batch.masks.get("attention_mask")
            current["mask"] = None if mask is None else mask.to(device)
            logits = real_tokens(model(**batch.to(device, model.dtype)).logits).float()
            ref_logits = real_tokens(ref_logits).float()
            diff += float((logits - ref_logits).pow(2).sum())
            ref_norm += float(ref_logits.pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    per_layer = [(d / r) ** 0.5 for d, r in sums.values() if r > 0]
    return {"layer_output_error": sum(per_layer) / len(per_layer), "layers_scored": len(per_layer),
            "logits_error": (diff / ref_norm) ** 0.5}


def run_ours(model, processor, samples, component, args, device):
    from lmms_quant.quant import Recipe, api, calibration, quantize

    calibration.load_samples = api.load_samples = lambda calib, n, seed: samples[:n]
    plan = Recipe.parse({"method": "gptq", "component": component, "bits": args.bits,
                                  "group_size": args.group_size, "calib_n": args.calib_n,
                                  "calib_batch_size": args.calib_batch_size})
    _sync(device)
    t0 = time.perf_counter()
    report = quantize(model, processor, plan, device=device, progress=False)
    _sync(device)
    return time.perf_counter() - t0, sorted(t.name for t in report.tensors)


def run_llmcompressor(model, processor, calib_batches, component, args, device, workdir: Path):
    from torch.utils.data import DataLoader

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": args.group_size, "actorder": None}
    if component == "vit":
        target = model.vision_model
        rows = [{"pixel_values": b.inputs["pixel_values"].to(device, model.dtype)} for b in calib_batches]
        ignore, pipeline, extra = [], "sequential", {"sequential_targets": ["Blip2EncoderLayer"]}
    else:
        target = model
        # its pipeline moves only tensors, so the batch's non-tensor options (use_cache=False) stay out
        rows = [{k: v for k, v in b.to(device, model.dtype).items() if isinstance(v, torch.Tensor)}
                for b in calib_batches]
        ignore = [f"re:^(?!{COMPONENT_PREFIX[component].replace('.', '[.]')}).*", "re:.*lm_head"]
        pipeline, extra = "basic", {}
    # oneshot validates name_or_path as a local dir or hub id; a model built from a config has none.
    config_dir = workdir / f"config_{component}"
    target.config.save_pretrained(config_dir)
    target.config._name_or_path = str(config_dir)
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=ignore,
                          dampening_frac=args.damp, block_size=128)
    loader = DataLoader(rows, batch_size=None, shuffle=False)
    _sync(device)
    t0 = time.perf_counter()
    oneshot(model=target, processor=processor, dataset=loader, recipe=recipe, pipeline=pipeline,
            num_calibration_samples=args.calib_n, **extra)
    _sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("blip2-opt-2.7b", "tiny"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--components", default="vit,llm", help="comma-separated, in order; each of: vit, llm")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="must divide every in_features (tiny: 32)")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--calib-n", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no new component after this many s")
    args = parser.parse_args(argv)
    for comp in args.components.split(","):
        if comp not in COMPONENT_PREFIX:
            parser.error(f"--components: got {comp!r}; valid: {', '.join(COMPONENT_PREFIX)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    device = args.device

    import compressed_tensors
    import llmcompressor
    import transformers

    from lmms_quant.quant.api import holdout_count
    from lmms_quant.quant.calibration import make_batches

    result = {
        "arch": args.arch, "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "card": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "grid": {"bits": args.bits, "group_size": args.group_size, "sym": False, "damp": args.damp,
                 "block_size": 128, "act_order": False},
        "calib_samples": args.calib_n, "calib_batch_size": args.calib_batch_size,
        "calib_samples_from": "shapes world (lmms_quant.fixtures.shapes), the same list for both", "components": [],
    }
    recorder = Recorder(args.out / f"bench_llmcompressor_{args.arch}.json", result)
    workdir = Path(tempfile.mkdtemp(prefix="bench_llmc_"))

    t0 = time.perf_counter()
    model, processor = (build_blip2_opt_27b if args.arch != "tiny" else build_tiny)(device)
    result["build_s"] = time.perf_counter() - t0
    pristine = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    n_holdout = holdout_count(args.calib_n)
    samples = _shapes_samples(args.calib_n + n_holdout, seed=0)
    calib_batches = make_batches(processor, "blip2_causal", samples[:args.calib_n], args.calib_batch_size)
    holdout = make_batches(processor, "blip2_causal", samples[args.calib_n:], args.calib_batch_size)
    result["holdout_samples"] = n_holdout
    with torch.no_grad():
        fp_logits = [model(**b.to(device, model.dtype)).logits for b in holdout]
    recorder.write()

    for component in args.components.split(","):
        if time.perf_counter() - started > args.deadline_s:
            result.setdefault("not_run", []).append(component)
            recorder.write()
            continue
        names = linear_names(model, component)
        modules = dict(model.named_modules())
        fp_weights = {n: modules[n].weight.detach().clone() for n in names}
        entry = {"component": component, "linears": len(names)}
        result["components"].append(entry)

        with recorder.running(f"ours {component}"):
            wall, ours_names = run_ours(model, processor, samples, component, args, device)
        entry["ours"] = {"wall_s": wall, **score(model, names, fp_weights, holdout, fp_logits, device)}
        entry["same_linears"] = ours_names == sorted(names)
        if not entry["same_linears"]:
            entry["linears_only_ours"] = sorted(set(ours_names) - set(names))
            entry["linears_only_llmcompressor"] = sorted(set(names) - set(ours_names))
        print(json.dumps(entry), flush=True)
        recorder.write()

        model.load_state_dict(pristine)
        with recorder.running(f"llmcompressor {component}"):
            wall = run_llmcompressor(model, processor, calib_batches, component, args, device, workdir)
        entry["llmcompressor"] = {"wall_s": wall, **score(model, names, fp_weights, holdout, fp_logits, device)}
        entry["llmcompressor"]["pipeline"] = "sequential (vision_model)" if component == "vit" else "basic"
        entry["time_ratio_llmcompressor_over_ours"] = wall / entry["ours"]["wall_s"]
        print(json.dumps(entry), flush=True)
        recorder.write()

        # llm-compressor leaves its quantization state on the modules: the next component gets a fresh model.
        del model, fp_weights
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        model, processor = (build_blip2_opt_27b if args.arch != "tiny" else build_tiny)(device)
        model.load_state_dict(pristine)

    recorder.stop.set()
    result["total_s"] = time.perf_counter() - started
    recorder.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
