"""Peak memory (and time) of retrieval's blockwise ITC ranking at COCO 5K scale. A benchmark, not a test.

COCO Karpathy 5K test is 5,000 images x ~25,000 captions. BLIP-2 embeds each image as 32 query
vectors and each caption as one vector, in 256 dimensions. Scoring that the way the transformers
forward pass does (image_embeds @ text_embeds.T, then max over queries) builds a
5,000 x 32 x 25,000 float32 tensor: 16 GB. ``lmms_quant.retrieval.rank_corpus`` computes the same
similarity in blocks of at most ``block_elements`` image x query x text entries and keeps only
k-best lists. This script measures the peak memory above the inputs for several block sizes, on
CPU (peak RSS of a fresh child process per run) and/or CUDA (the caching allocator's peak), and with
``--dense`` also the naive whole-tensor computation for comparison.

    python scripts/bench_retrieval_memory.py --devices cpu cuda --out benchmarks/retrieval_memory

Writes ``<out>/bench_retrieval_memory.json`` and ``.md`` (each atomically: temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MIB = 2**20


def _features(n_images: int, n_texts: int, n_queries: int, dim: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(n_images, n_queries, dim, generator=g, device=device)
    texts = torch.randn(n_texts, dim, generator=g, device=device)
    return torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(texts, dim=-1)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _work(config: dict, images: torch.Tensor, texts: torch.Tensor):
    from lmms_quant import retrieval

    captions_per_image = [config["captions_per_image"]] * config["images"]
    if config["mode"] == "dense":
        # What the transformers forward pass does: the whole (images, queries, texts) tensor at once.
        sim = torch.einsum("iqd,td->iqt", images, texts).amax(dim=1)
        return sim.shape
    if config["mode"] == "blockwise_rerank":
        # Candidates + the re-ranking bookkeeping (pair de-duplication, score lookup), ITM itself replaced
        # by a constant so only retrieval's own memory is measured.
        def scorer(i, t):
            return torch.zeros(len(i), device=i.device)
    else:
        scorer = None
    ranks = retrieval.rank_corpus(
        images, texts, captions_per_image, k=config["k"], pair_scorer=scorer, block_elements=config["block_elements"]
    )
    return len(ranks.i2t), len(ranks.t2i)


def run_one(config: dict) -> dict:
    """One measurement in this process: peak bytes above the inputs, and seconds."""
    torch.set_num_threads(config["threads"])
    device = config["device"]
    n_texts = config["images"] * config["captions_per_image"]
    images, texts = _features(config["images"], n_texts, config["queries"], config["dim"], device)
    # Library start-up (BLAS workspaces, CUDA context, imports) is not the ranking's memory.
    warm_up = dict(config, images=12, block_elements=min(config["block_elements"] or 2**10, 2**10), k=10)
    _work(warm_up, *_features(12, 12 * config["captions_per_image"], config["queries"], config["dim"], device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    _work(config, images, texts)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - start
    inputs = images.numel() * images.element_size() + texts.numel() * texts.element_size()
    return {**config, "texts": n_texts, "peak_above_inputs_mib": peak / MIB, "inputs_mib": inputs / MIB,
            "seconds": seconds}


def run_isolated(config: dict) -> dict:
    """CPU runs go to a fresh child process: peak RSS is a process-wide high-water mark."""
    if config["device"] != "cpu":
        return run_one(config)
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child run {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_atomically(path: Path, text: str) -> None:
    from lmms_quant.atomic import write_text_atomic

    write_text_atomic(path, text)


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Retrieval ranking memory at COCO 5K scale",
        "",
        f"{meta['images']} images x {meta['queries']} queries, {meta['texts']} texts, dim {meta['dim']}, "
        f"float32, shortlist k = {meta['k']}. Inputs: {rows[0]['inputs_mib']:.0f} MiB. The naive "
        f"(images, queries, texts) similarity tensor alone is {meta['dense_tensor_mib']:.0f} MiB.",
        "",
        f"torch {meta['torch']}, {meta['machine']}, {meta['threads']} CPU thread(s); CUDA device: "
        f"{meta['cuda_device'] or 'none'}. "
        "CPU: peak RSS of a fresh process minus RSS with the inputs loaded; CUDA: allocator peak minus "
        "allocated inputs.",
        "",
        "| device | mode | block_elements | peak above inputs (MiB) | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        block = "-" if row["mode"] == "dense" else f"2^{row['block_elements'].bit_length() - 1}"
        lines.append(f"| {row['device']} | {row['mode']} | {block} | {row['peak_above_inputs_mib']:.0f} | {row['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--block-elements", type=int, nargs="+", default=[2**22, 2**24, 2**26])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--dense", action="store_true", help="also the naive whole-tensor computation")
    parser.add_argument("--out", default="benchmarks/retrieval_memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return 0
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: CUDA is not available here; valid: cpu")
    shape = dict(images=args.images, captions_per_image=args.captions_per_image, queries=args.queries,
                 dim=args.dim, k=args.k, threads=args.threads)
    configs = []
    for device in args.devices:
        for block in args.block_elements:
            for mode in ("blockwise", "blockwise_rerank"):
                configs.append(dict(shape, device=device, mode=mode, block_elements=block))
        if args.dense:
            configs.append(dict(shape, device=device, mode="dense", block_elements=0))
    rows = []
    for config in configs:
        row = run_isolated(config)
        print(f"{row['device']:>4} {row['mode']:<17} block {row['block_elements']:>9}: "
              f"{row['peak_above_inputs_mib']:9.1f} MiB above inputs, {row['seconds']:7.2f} s", flush=True)
        rows.append(row)
    n_texts = args.images * args.captions_per_image
    meta = dict(shape, texts=n_texts, torch=torch.__version__, machine=platform.platform(),
                cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                dense_tensor_mib=args.images * args.queries * n_texts * 4 / MIB)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "bench_retrieval_memory.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _write_atomically(out / "bench_retrieval_memory.md", _markdown(meta, rows))
    print(f"wrote {out / 'bench_retrieval_memory.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
