"""Gemma 3 and PaliGemma (1 and 2): SigLIP tower, Gemma language models with (1 + w) RMSNorms.

Gemma's RMSNorm computes x_hat * (1 + w). A fold into it is exact only as w' = (1 + w) / s - 1
(Fold.weight_offset = 1), never as w / s. The SigLIP tower is taken without its attention-pooling
head (``vision_use_head=False`` in both families' checkpoints); a tower that has one fails the table
by name.

Gemma 3's projector (``model.multi_modal_projector``: average pool, Gemma RMSNorm, then
``mm_input_projection_weight`` applied with torch.matmul) has no nn.Linear: the engine quantizes
nn.Linear weights only, so the Gemma 3 connector stays in floating point and ``component=connector``
is refused (the model has no quantizable connector); ``lmms-quant inspect`` lists the weight.
PaliGemma's projector is one Linear (``model.multi_modal_projector.linear``).
"""

from __future__ import annotations

from ..spec import BlockSpec, Family, Part
from .blocks import CLIP_BLOCK

_ROOTS = {"vit": ("model.vision_tower",), "connector": ("model.multi_modal_projector",),
          "llm": ("model.language_model", "lm_head")}


def _parts(connector: dict[str, str], text_block: BlockSpec) -> tuple[Part, ...]:
    parts = [Part("vit", stack="model.vision_tower.encoder.layers", block=CLIP_BLOCK, config="vision_config")]
    if connector:
        parts.append(Part("connector", linears=connector))
    parts += [
        Part("llm", stack="model.language_model.layers", block=text_block, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ]
    return tuple(parts)


def gemma3(text_block: BlockSpec) -> Family:
    return Family(
        name="gemma3", roots=_ROOTS, parts=_parts({}, text_block), prompt_style="chat",
        notes=("model.multi_modal_projector.mm_input_projection_weight is a matmul weight, not an nn.Linear: "
               "the Gemma 3 connector stays in floating point",),
    )


def paligemma(name: str, text_block: BlockSpec) -> Family:
    # No chat template on the hub checkpoints: "generic" prompts are the bare question and answer.
    return Family(name=name, roots=_ROOTS, parts=_parts({"model.multi_modal_projector.linear": "proj.fc"}, text_block),
                  prompt_style="generic")


__all__ = ["gemma3", "paligemma"]
