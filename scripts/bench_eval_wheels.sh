#!/usr/bin/env bash
# Wheels scripts/bench_eval.py needs on a GPU machine that has torch, transformers, numpy, pandas,
# pyarrow, aiohttp, httpx, sacrebleu, sympy, jinja2 ... but no package index: lmms-eval 0.7.3 and the
# part of its dependencies its evaluator imports for the bench's tasks (no pycocoevalcap: the bench's
# caption task scores without Java). Run here, where pip reaches PyPI:
#     bash scripts/bench_eval_wheels.sh [.whl]
# then carry that folder and install it there with --no-deps (see the command in scripts/bench_eval.py).
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    lmms-eval==0.7.3 datasets==5.2.0 "dill==0.4.1" "multiprocess==0.70.19" evaluate==0.4.6 loguru==0.7.3 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 \
    pytz==2026.6 tenacity==9.2.1 zstandard==0.25.0 numexpr==2.14.2 chardet==6.0.0.post1 "filelock==3.32.7"
du -sh "$dest"
