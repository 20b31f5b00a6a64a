"""Packed export at real scale: checkpoint size on disk and GPU memory once loaded. A benchmark, not a test.

    python scripts/bench_export.py --out benchmarks/export                       # CUDA: the real sizes
    python scripts/bench_export.py --arch tiny --device cpu --out /tmp/bench     # CPU: the tiny fixtures (no memory figure)

``blip2-opt-2.7b`` (bench_gpu.py's build: ViT-g 39x1408, Q-Former 12x768, OPT 32x2560) is exported at
W4 on each component and on all of them; ``llava-1.5-7b`` (CLIP ViT-L/14-336 24x1024, 2-layer
projector, Llama 32x4096, vocabulary 32064) at W4 on the LLM. Random weights (std 0.02), fp16, built
in code: sizes do not depend on values. Each run rebuilds the model (export packs it in place),
quantizes it with RTN (the packed size does not depend on the method) at ``--bits`` with group size
``--group-size``, symmetric by default (the W4A16 scheme vLLM serves; transformers <= 5.24 cannot load
asymmetric packed zero-points compressed, so no memory figure for --asym), writes the
compressed-tensors checkpoint and records the weight files' bytes, the GPU bytes transformers holds
after ``from_pretrained`` with the weights kept packed (before any forward), next to the fp16 model's
weight bytes and the size the quantization report accounts (fp16 scales; the file stores fp32
scales, exactly the simulated ones). Results: ``<out>/bench_export_<arch>.json``, rewritten (temp
file + rename) after every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = {"blip2-opt-2.7b": ("vit", "connector", "llm", "all"), "llava-1.5-7b": ("llm",),
        "tiny-blip2-opt": ("vit", "connector", "llm", "all"), "tiny-llava": ("llm",)}
SETS = {"real": ("blip2-opt-2.7b", "llava-1.5-7b"), "tiny": ("tiny-blip2-opt", "tiny-llava")}


def _random_fp16(model_class, config, device):
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


def build_llava_15_7b(device):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from lmms_quant.fixtures.models import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE, image_token_id, lm_tokenizer

    tok = lm_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14,
                                       projection_dim=768).to_dict(),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id).to_dict(),
        image_token_index=image_token_id(tok), image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = _random_fp16(LlavaForConditionalGeneration, config, device)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1)
    return model, processor


def build(arch: str, device):
    from scripts import bench_gpu

    if arch == "blip2-opt-2.7b":
        return bench_gpu.build_blip2_opt_27b(device)
    if arch == "llava-1.5-7b":
        return build_llava_15_7b(device)
    from transformers import AutoProcessor

    from lmms_quant.fixtures.models import FIXTURE_BUILDERS, FIXTURE_MODEL_CLASSES

    kind = {"tiny-blip2-opt": "blip2_opt", "tiny-llava": "llava"}[arch]
    path = Path(tempfile.gettempdir()) / "lmms_quant_bench_export" / kind
    if not (path / "config.json").is_file():
        FIXTURE_BUILDERS[kind](path)
    return FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).to(device).eval(), AutoProcessor.from_pretrained(path)


def _write(path: Path, data: dict) -> None:
    from lmms_quant.atomic import write_json_atomic

    write_json_atomic(path, data, sort_keys=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=(*SETS, *RUNS), default="real",
                        help="real = blip2-opt-2.7b then llava-1.5-7b; tiny = the fixtures of both families")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "export")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None, help="default 128 (32 for --arch tiny)")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (no loaded-memory figure, see above)")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written (deleted after)")
    args = parser.parse_args(argv)

    from lmms_quant.quant import Recipe, api, calibration, quantize
    from lmms_quant.quant.export import export_run, require_compressed_tensors
    from scripts import bench_gpu

    require_compressed_tensors()
    try:
        import datasets  # noqa: F401
    except ImportError:  # the GPU machine may lack `datasets`: calibration samples straight from the shapes world
        calibration.load_samples = api.load_samples = lambda calib, n, seed: bench_gpu._shapes_samples(n, seed)
    import compressed_tensors
    import transformers

    device = torch.device(args.device)
    archs = SETS.get(args.arch, (args.arch,))
    group_size = args.group_size or (32 if archs[0].startswith("tiny") else 128)
    work = Path(tempfile.mkdtemp(prefix="bench_export.", dir=args.workdir))
    try:
        for arch in archs:
            result = {"arch": arch, "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "card": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else platform.processor() or "cpu"),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "compressed_tensors": compressed_tensors.__version__, "command": " ".join(sys.argv),
                      "bits": args.bits, "group_size": group_size, "sym": not args.asym, "method": "rtn", "runs": []}
            out_path = args.out / f"bench_export_{arch}.json"
            for component in RUNS[arch]:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model, processor = build(arch, device)
                dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
                recipe = Recipe.parse({"method": "rtn", "bits": args.bits, "group_size": group_size,
                                       "sym": not args.asym, "component": component, "calib_n": 8})
                t0 = time.perf_counter()
                report = quantize(model, processor, recipe, device=device, keep_codes=True, progress=False)
                quantize_s = time.perf_counter() - t0
                target = work / f"{arch}_{component}"
                t0 = time.perf_counter()
                data = export_run(model, processor, report, target, device=device)
                export_s = time.perf_counter() - t0  # includes the measuring load on CUDA
                record = data["export"]
                run = {"component": component, "model_class": type(model).__name__,
                       "quantized_linears": len(report.tensors),
                       "params": report.total.params, "quantized_params": report.total.quantized_params,
                       "dense_state_bytes": dense_bytes, "dtype": str(model.dtype),
                       "accounted_bytes": report.total.to_dict()["stored_size_bytes"],
                       "accounted_bpw": report.total.to_dict()["stored_bits_per_weight"],
                       "file_bytes": record["file_bytes"],
                       "file_bpw": 8 * record["file_bytes"] / report.total.params,
                       "loaded_memory_bytes": record["loaded_memory_bytes"], "memory_device": record["device"],
                       "file_vs_dense": record["file_bytes"] / dense_bytes, "quantize_s": quantize_s,
                       "export_s": export_s, "notes": [n for n in data["notes"] if n.startswith("export:")]}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
                _write(out_path, result)
                del model, processor, report, data
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
