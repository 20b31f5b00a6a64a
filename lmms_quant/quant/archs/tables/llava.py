"""LLaVA-1.5, LLaVA-NeXT (1.6) and LLaVA-OneVision: one layout (v5 module names).

``model.vision_tower`` (CLIP, or SigLIP without its pooling head), ``model.multi_modal_projector``
(linear_1 -> GELU -> linear_2: no exact fold through the GELU), ``model.language_model`` with
Llama-named layers, ``lm_head``. NeXT and OneVision add ``model.image_newline`` (a learned vector
the projector's output is laid out with: connector, not quantized: it is not a Linear).
"""

from __future__ import annotations

from ..spec import Family, Part
from .blocks import CLIP_BLOCK, LLAMA_BLOCK

_PROJECTOR = {"model.multi_modal_projector.linear_1": "proj.fc1", "model.multi_modal_projector.linear_2": "proj.fc2"}


def _llava(name: str, connector_roots: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        roots={"vit": ("model.vision_tower",), "connector": connector_roots,
               "llm": ("model.language_model", "lm_head")},
        parts=(
            Part("vit", stack="model.vision_tower.encoder.layers", block=CLIP_BLOCK, config="vision_config"),
            Part("connector", linears=_PROJECTOR),
            Part("llm", stack="model.language_model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
                 config="text_config"),
            Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
        ),
        prompt_style="llava" if name == "llava" else "chat",
    )


LLAVA = _llava("llava", ("model.multi_modal_projector",))
LLAVA_NEXT = _llava("llava_next", ("model.multi_modal_projector", "model.image_newline"))
LLAVA_ONEVISION = _llava("llava_onevision", ("model.multi_modal_projector", "model.image_newline"))

__all__ = ["LLAVA", "LLAVA_NEXT", "LLAVA_ONEVISION"]
