"""scripts/bootstrap.sh's pip filter: the lean install's known noise goes, everything else stays."""

import subprocess
import sys
from pathlib import Path

from lmms_quant.scripts.pip_filter import RESOLVER_HEADER, configured_locations, filter_pip_output

CONFIG = """global.cert='/etc/ssl/certs/ca-certificates.crt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
:env:.default-timeout='180'
"""
LOCATIONS = configured_locations(CONFIG)


def test_the_configured_file_locations_are_read_from_pip_config_list():
    assert LOCATIONS == ["file:///opt/pypi/simple/", "file:///opt/pypi-more/simple/", "/opt/wheels/"]
    assert configured_locations("") == []


def test_lmms_evals_skipped_requirements_become_one_line_and_real_conflicts_stay():
    pip_output = [
        "WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory.",
        RESOLVER_HEADER,
        "lmms-eval 0.7.3 requires av<16.0.0, which is not installed.",
        "lmms-eval 0.7.3 requires hf_transfer, which is not installed.",
        "lmms-eval 0.7.3 requires hf_transfer, which is not installed.",
        "lmms-eval 0.7.3 requires wandb==0.25.0, which is not installed.",
        "Successfully installed nothing",
    ]
    assert list(filter_pip_output(pip_output, LOCATIONS)) == [
        "Successfully installed nothing",
        "(lmms-eval 0.7.3 is installed without 3 of its requirements, on purpose: the lean install of "
        "scripts/bootstrap.sh; pip's notes about them are not shown)"]
    conflict = "transformers 5.24.0 has requirement tokenizers<0.23, but you have tokenizers 0.30.0."
    version = "lmms-eval 0.7.3 requires datasets==2.16.1, but you have datasets 5.2.0 which is incompatible."
    kept = list(filter_pip_output([RESOLVER_HEADER, "lmms-eval 0.7.3 requires nltk, which is not installed.",
                                   conflict, version], LOCATIONS))
    assert kept[:3] == [RESOLVER_HEADER, conflict, version] and len(kept) == 4


def test_warnings_about_locations_this_machine_does_not_configure_and_errors_are_printed():
    other = "WARNING: Location 'file:///srv/mirror/simple/torch/' is ignored: it is neither a file nor a directory."
    error = "ERROR: Could not find a version that satisfies the requirement torch==9.9"
    assert list(filter_pip_output([other, error], LOCATIONS)) == [other, error]
    assert list(filter_pip_output([other], [])) == [other]


def test_the_filter_passes_pip_output_through_and_exits_zero():
    script = Path(__file__).resolve().parents[1] / "scripts" / "pip_filter.py"
    proc = subprocess.run([sys.executable, str(script)], input="Collecting x\nERROR: No matching distribution\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "Collecting x\nERROR: No matching distribution\n"
