"""``lmms-quant demo``: the whole product on the model it ships, offline, in minutes on a laptop CPU.

The shipped checkpoints (``lmms_quant/assets``) are a BLIP-2-architecture captioning/VQA model and a
BLIP-2 image-text-retrieval model, trained by ``scripts/train_tiny_vlm.py`` on a synthetic world of
coloured shapes. The demo writes held-out data of that world in lmms-eval's schemas, runs two sweeps
through lmms-eval (captions + VQA with ``quant_blip2``; retrieval with ``quant_blip2_itm``) at FP16
and a grid of quantization plans, then prints the leaderboard and writes the HTML page. These are
the numbers of ~0.5M-parameter models on synthetic data — a demonstration of the pipeline and of
real quantization effects, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from lmms_quant.cpu import cpu_info

ASSETS = Path(__file__).resolve().parent / "assets"

# What varies: method × bits × component, as in the paper's component study. "rtn_tensor" is the
# paper's uniform per-tensor min-max quantizer; GPTQ and AWQ use their usual grouped grids.
METHODS = {
    "rtn_tensor": {"method": "rtn", "granularity": "uniform"},
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
}
# float32, not bfloat16: CPUs compute bf16 differently (oneDNN takes AMX or AVX512-BF16 where they
# exist, and PyTorch's bf16 matmul refuses to run on pinned AVX2 kernels), and at 2 bits one last-bit
# difference flips GPTQ/AWQ codes and moves the scores. Bits per weight are counted against a 16-bit
# baseline whatever the stored dtype, so float32 costs no bpw.
DTYPE = "float32"
# The arithmetic of every demo evaluation, fixed before torch is imported (the configurations are
# forks of this process): one thread, so no reduction is split by the machine's core count, and on
# x86-64 CPUs with AVX2 the AVX2 code paths of PyTorch's kernels, MKL (its conditional numerical
# reproducibility branch) and oneDNN, so a CPU with AVX-512 or AMX computes what any AVX2 CPU does.
PINNED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PINNED_X86_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CAPTION_COMPONENTS = ("vit", "connector", "llm")
RETRIEVAL_COMPONENTS = ("vit", "connector")


def _configurations(components: tuple[str, ...], bits_list: tuple[int, ...], full: bool) -> list[dict]:
    """Every method at every bit width on the whole model; per component, every method (``full``) or
    only per-tensor RTN at the lowest bit width — the cheapest view of which part is sensitive."""
    whole = [{**plan, "bits": bits, "component": "all"} for plan in METHODS.values() for bits in bits_list]
    per_component_methods = METHODS.values() if full else [METHODS["rtn_tensor"]]
    per_component_bits = bits_list if full else (min(bits_list),)
    parts = [{**plan, "bits": bits, "component": component} for plan in per_component_methods
             for bits in per_component_bits for component in components]
    return whole + parts


def arithmetic_pins(cpu_flags) -> dict[str, str]:
    """The environment that fixes the demo's arithmetic on a CPU with these feature flags."""
    return {**PINNED_THREADS, **(PINNED_X86_AVX2 if {"avx2", "fma"} <= set(cpu_flags) else {})}


def pin_arithmetic() -> str:
    """Fix the demo's threads and, on an x86-64 CPU with AVX2, its kernels; returns a line saying so.

    The libraries read these variables when they start, so this runs before torch is imported; in a
    process that has imported it already only the thread count can still be fixed."""
    pins = arithmetic_pins(cpu_info()[1])
    os.environ.update(pins)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)
        return (f"arithmetic: {DTYPE}, 1 thread; torch was imported before the demo started, so its kernels are "
                f"this CPU's own: other CPUs may give other scores")
    if "ATEN_CPU_CAPABILITY" in pins:
        return (f"arithmetic: {DTYPE}, 1 thread, AVX2 kernels in PyTorch, MKL (CBWR) and oneDNN, so that other x86-64 "
                f"CPUs with AVX2 compute the same numbers")
    return (f"arithmetic: {DTYPE}, 1 thread; this CPU has no AVX2, so its kernels are its own: other CPUs may "
            f"give other scores")


def demo_grids(out: Path, data_root: Path, bits: tuple[int, ...], calib_n: int, full: bool) -> list[dict]:
    """The two grid definitions the demo runs (the same schema as a `lmms-quant sweep` YAML file)."""
    common = {"data_root": str(data_root), "batch_size": 16}
    return [
        {
            **common,
            "model": "quant_blip2",
            "model_args": {"pretrained": str(ASSETS / "tiny_blip2"), "dtype": DTYPE, "calib_n": calib_n},
            "tasks": ["coco2017_cap_val_local", "vqav2_val_local"],
            "include": _configurations(CAPTION_COMPONENTS, bits, full),
            "output_dir": str(out / "runs" / "blip2"),
        },
        {
            **common,
            "model": "quant_blip2_itm",
            "model_args": {"pretrained": str(ASSETS / "tiny_blip2_itm"), "dtype": DTYPE, "calib_n": calib_n},
            "tasks": ["flickr30k_retrieval_local"],
            "include": _configurations(RETRIEVAL_COMPONENTS, bits, full),
            "output_dir": str(out / "runs" / "blip2_itm"),
        },
    ]


# The tasks whose aggregations are lmms_quant.caption_metrics' (METEOR among them).
CAPTION_TASKS = {"coco2017_cap_val_local", "flickr30k_test_local"}


def write_data(data_root: Path, n_images: int) -> Path:
    """Held-out data: the evaluation seed stream of the synthetic world (training and calibration draw
    from other streams). Rewritten identically on every run, so a rerun resumes the same sweep."""
    from datasets import disable_progress_bars

    from lmms_quant.fixtures.datasets import write_lmms_eval_datasets
    from lmms_quant.fixtures.retrieval_data import write_retrieval_datasets

    disable_progress_bars()  # datasets' per-file "Creating parquet" bars say nothing here
    write_lmms_eval_datasets(data_root, n_images=n_images, seed=0)
    write_retrieval_datasets(data_root, n_images=n_images, seed=0)
    return data_root


def run_grid(spec: dict, select=None) -> dict[str, str]:
    """Run one demo grid (``select`` keeps some of its configurations); run id -> ok | skipped | failed.

    Each configuration is a fork of this process, which has imported lmms-eval, indexed its tasks
    (`lmms_quant.task_index`) and started the METEOR scorer (`lmms_quant.caption_metrics`) once for
    all of them."""
    from lmms_quant.caption_metrics import share_meteor, stop_shared_meteor
    from lmms_quant.sweep import SweepRunner, completed_run, load_grid
    from lmms_quant.task_index import share_task_index
    from lmms_quant.tasks_path import render_tasks

    grid = load_grid(data=spec)
    configurations = [c for c in grid.configurations if select is None or select(c)]
    n = len(configurations)
    baseline = " + the fp16 baseline" if any(c.is_baseline for c in configurations) else ""
    print(f"== {spec['model']}: {n} configurations ({n - bool(baseline)}{baseline}) on {', '.join(spec['tasks'])}",
          flush=True)
    runner = SweepRunner(grid.output_dir, fork=True)
    if not all(completed_run(runner.run_dir(c), c.run_id) for c in configurations):
        share_task_index([render_tasks(spec["data_root"])])
        if CAPTION_TASKS & set(spec["tasks"]):
            share_meteor()  # one METEOR process for every configuration's caption scores
    try:
        return runner.run(configurations)
    finally:
        stop_shared_meteor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmms-quant demo",
        description="Evaluate the shipped tiny VLMs through lmms-eval at FP16 and a grid of quantization plans, "
                    "then write the leaderboard (Markdown, CSV, HTML).")
    parser.add_argument("--out", default="lmms-quant-demo", help="output directory (default ./lmms-quant-demo)")
    parser.add_argument("--n-images", type=int, default=40, help="held-out images per task (default 40)")
    parser.add_argument("--bits", default="4,3,2", help="bit widths, comma-separated (default 4,3,2)")
    parser.add_argument("--calib-n", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument("--full", action="store_true",
                        help="every method at every bit width per component too (about 2.5x the configurations)")
    args = parser.parse_args(argv)
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        print(f"lmms-quant demo: --bits: {args.bits!r} must be comma-separated integers, e.g. 4,3", file=sys.stderr)
        return 2
    if args.n_images < 5:
        print(f"lmms-quant demo: --n-images: {args.n_images} is too few for R@5/R@10; valid: >= 5", file=sys.stderr)
        return 2
    for name in ("tiny_blip2", "tiny_blip2_itm"):
        if not (ASSETS / name / "model.safetensors").is_file():
            print(f"lmms-quant demo: the shipped checkpoint {ASSETS / name} is missing", file=sys.stderr)
            return 1
    arithmetic = pin_arithmetic()  # before anything imports torch

    from lmms_quant.leaderboard import compact_markdown, write_leaderboard
    from lmms_quant.sweep import GridError

    started = time.monotonic()
    out = Path(args.out).resolve()
    print(arithmetic, flush=True)
    data_root = write_data(out / "data", args.n_images)
    failed = 0
    for spec in demo_grids(out, data_root, bits, args.calib_n, args.full):
        try:
            outcome = run_grid(spec)
        except GridError as err:
            print(f"lmms-quant demo: {err}", file=sys.stderr)
            return 2
        failed += sum(status == "failed" for status in outcome.values())
    written, table = write_leaderboard(out / "runs", out)
    print()
    print(compact_markdown(table))  # the leaderboard's compact table, as leaderboard.md shows it
    print("Δ vs the FP16 baseline [95% paired bootstrap interval]; *: the interval excludes 0.")
    print()
    minutes = (time.monotonic() - started) / 60
    print(f"{len(table.rows)} configurations in {math.floor(minutes)}m{round(minutes % 1 * 60):02d}s. "
          f"Models of ~0.5M parameters on synthetic data: these are not the paper's numbers.")
    for path in written.values():
        print(f"wrote {path}")
    if failed:
        print(f"lmms-quant demo: {failed} configuration(s) failed; see the log.txt files under {out / 'runs'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
