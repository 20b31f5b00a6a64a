#!/usr/bin/env bash
# One command from a fresh clone to a working lmms-quant:
#   bash scripts/bootstrap.sh demo   # set up, then run the demo (the main job) on the embedded model
#   bash scripts/bootstrap.sh test   # set up with test extras, then run the test suite
# Extra arguments go to `lmms-quant demo` / pytest.
#
# The virtualenv (.venv, or $LMMS_QUANT_VENV) gets the *lean* lmms-eval install: lmms-eval itself with
# --no-deps plus the packages its caption/VQA/GQA tasks really import (the `lmms-eval-lean` extra), and
# a CPU torch — 1.9 GB in 2 minutes instead of lmms-eval's full 6.9 GB dependency set with CUDA
# wheels. On a GPU machine, `pip install lmms-quant` (full dependencies) is the normal route.
set -euo pipefail
mode=${1:-}
case "$mode" in demo|test) shift ;; *) echo "usage: bash scripts/bootstrap.sh demo|test [args...]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
venv=${LMMS_QUANT_VENV:-.venv}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# System packages: caption metrics (pycocoevalcap's PTB tokenizer and METEOR) run Java; the tests
# open the leaderboard page in headless Chromium.
apt_needed=()
command -v java >/dev/null 2>&1 || apt_needed+=(default-jre-headless)
[ "$mode" = test ] && ! command -v chromium >/dev/null 2>&1 && apt_needed+=(chromium)
if [ ${#apt_needed[@]} -gt 0 ]; then
  echo "== apt-get install ${apt_needed[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_needed[@]}" >/dev/null
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
stamp="$venv/.lmms-quant-installed-$mode"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
# pip, less two kinds of noise (scripts/pip_filter.py says which); pip's exit status is kept (pipefail).
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | "$py" scripts/pip_filter.py; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing into $venv"
  # The tests also run lmms-eval's own qwen2_5_vl (extra lmms-eval-models), whose qwen-vl-utils imports
  # torchvision; PyPI's torchvision fails to load beside the CPU torch build, so test mode takes the
  # matching pair (a CUDA build, on the CPU here).
  torch_spec=${LMMS_QUANT_TORCH:-torch==2.13.0}
  [ "$mode" = test ] && torch_spec=${LMMS_QUANT_TORCH:-torch==2.14.1 torchvision==0.29.1}
  # shellcheck disable=SC2086  # the spec may name several packages
  pip_install $torch_spec
  pip_install --no-deps "lmms-eval==0.7.3"
  extras="lmms-eval-lean"; [ "$mode" = test ] && extras="$extras test lmms-eval-models families"
  # Our own dependencies (less lmms-eval, installed above without its heavy pins) and the extras,
  # read from pyproject.toml so that this script never keeps a second list.
  deps=$("$py" - "$extras" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = [r for r in project["dependencies"] if not r.replace(" ", "").startswith("lmms-eval")]
for extra in sys.argv[1].split():
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PY
)
  mapfile -t dep_list <<<"$deps"
  pip_install "${dep_list[@]}"
  pip_install --no-deps -e .
  echo "$want" > "$stamp"
fi

if [ "$mode" = test ]; then
  exec "$venv/bin/python" -m pytest -q "$@"
else
  exec "$venv/bin/lmms-quant" demo "$@"
fi
