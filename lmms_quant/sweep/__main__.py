"""``python -m lmms_quant.sweep GRID.yaml ...`` is ``lmms-quant sweep GRID.yaml ...``."""

import sys

from lmms_quant.sweep.cli import main

sys.exit(main())
