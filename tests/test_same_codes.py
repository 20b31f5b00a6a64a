"""Same recipe, same codes: the quantized weights of the fixtures are pinned across refactors.

The digests below were computed with the engine as it stood before the recipe refactor (commit
4c671b4, `QuantPlan` + `quantize_model`) and are unchanged by it. A change of the engine that moves
them must say why (a fidelity fix), and re-pin them in the same commit.

Only round-to-nearest is pinned bit for bit: it is elementwise arithmetic, the same on every CPU and
torch build. GPTQ and AWQ go through matrix products and a Cholesky whose last bits differ between
torch builds (the CPU and CUDA wheels of one release already differ), so their codes are pinned
within one run instead: against the reference loop (test_quant_gptq_exact.py) and by their defining
properties (test_quant_methods.py). At the refactor, GPTQ and AWQ digests were also compared old vs
new on one machine and were identical.
"""

import hashlib

import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant import Recipe, quantize

PINNED = {"blip2_opt:rtn": "ae92e3643473403e", "llava:rtn": "dc364c7fca56282e"}


def state_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_quantized_weights_of_the_fixtures_are_pinned(tiny_checkpoints, case):
    kind, method = case.split(":")
    recipe = {"method": method, "bits": 3, "group_size": 32, "calib_n": 8, "calib_batch_size": 4}
    if method == "gptq":
        recipe["act_order"] = False
    path = tiny_checkpoints[kind]
    model = FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).eval()
    before = state_digest(model)
    with torch.no_grad():
        quantize(model, AutoProcessor.from_pretrained(path), Recipe.parse(recipe), progress=False)
    assert before != state_digest(model) == PINNED[case]
