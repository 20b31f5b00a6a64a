"""``python -m lmms_quant.leaderboard RUNS_DIR``: the same as ``lmms-quant leaderboard``."""

import sys

from lmms_quant.leaderboard import main

sys.exit(main())
