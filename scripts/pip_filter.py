"""Filter for pip's output in ``scripts/bootstrap.sh``: only what is worth reading gets through.

Two kinds of lines are dropped, nothing else:

- pip's resolver notes that ``lmms-eval <version> requires X, which is not installed``. bootstrap.sh
  installs lmms-eval with ``--no-deps`` and only the packages its caption/VQA/retrieval tasks import,
  on purpose, so pip lists lmms-eval's other 20-odd requirements on every install. They become one
  line saying so. Any other line of that block (another package's conflict, a version that does not
  match) is printed with the block's header, as pip wrote it.
- ``WARNING: Location '<url>' is ignored: it is neither a file nor a directory.`` for a location
  that this machine's pip configuration names (``pip config list``: a local index mirror without
  that package). A location the configuration does not name is printed.

Usage: ``python -m pip install ... 2>&1 | python scripts/pip_filter.py``. Reads stdin, writes stdout,
line by line, and always exits 0 (bootstrap.sh takes pip's status from the pipeline).
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Iterable, Iterator

RESOLVER_HEADER = ("ERROR: pip's dependency resolver does not currently take into account all the packages "
                   "that are installed. This behaviour is the source of the following dependency conflicts.")
SKIPPED_REQUIREMENT = re.compile(r"^lmms-eval (?P<version>\S+) requires (?P<requirement>.+), which is not installed\.$")
# Other lines pip writes inside that block: "<dist> <version> requires <req>, ..." / "... has requirement ...".
CONFLICT = re.compile(r"^\S+ \S+ (requires|has requirement) ")
IGNORED_LOCATION = re.compile(r"^WARNING: Location '(?P<location>[^']+)' is ignored: "
                              r"it is neither a file nor a directory\.$")
LOCATION_KEYS = ("index-url", "extra-index-url", "find-links")


def configured_locations(config_list: str) -> list[str]:
    """The file locations named in ``pip config list`` output (index URLs, find-links)."""
    locations = []
    for line in config_list.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] not in LOCATION_KEYS:
            continue
        for item in value.strip().strip("'\"").split():
            if item.startswith("file:") or item.startswith("/"):
                locations.append(item.rstrip("/") + "/")
    return locations


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def filter_pip_output(lines: Iterable[str], locations: Iterable[str]) -> Iterator[str]:
    """The lines worth reading (without newlines), then one line for the lmms-eval notes dropped."""
    locations = tuple(locations)
    skipped: dict[str, None] = {}
    version = None
    header_pending = False  # inside the resolver block, its header not printed yet
    in_block = False
    for raw in lines:
        line = raw.rstrip("\n")
        if line == RESOLVER_HEADER:
            in_block, header_pending = True, True
            continue
        if in_block:
            match = SKIPPED_REQUIREMENT.match(line)
            if match:
                version = match["version"]
                skipped[_requirement_name(match["requirement"])] = None
                continue
            if CONFLICT.match(line):
                if header_pending:
                    header_pending = False
                    yield RESOLVER_HEADER
                yield line
                continue
            in_block = header_pending = False
        location = IGNORED_LOCATION.match(line)
        if location and any(f"{location['location'].rstrip('/')}/".startswith(prefix) for prefix in locations):
            continue
        yield line
    if skipped:
        yield (f"(lmms-eval {version} is installed without {len(skipped)} of its requirements, on purpose: the "
               f"lean install of scripts/bootstrap.sh; pip's notes about them are not shown)")


def main() -> int:
    try:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        config = ""
    for line in filter_pip_output(sys.stdin, configured_locations(config)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
