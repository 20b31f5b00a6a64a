"""Gemma 3 and PaliGemma (1 and 2): SigLIP tower, Gemma language models with (1 + w) RMSNorms.

Gemma's RMSNorm computes x_hat * (1 + w). A fold into it is exact only as w' = (1 + w) / s - 1
(Fold.weight_offset = 1), never as w / s. The SigLIP tower is taken without its attention-pooling
head (``vision_use_head=False`` in both families' checkpoints); a tower that has one fails the table
by name.

Gemma 3's projector (``model.multi_modal_projector``: average pool, Gemma RMSNorm, then
``mm_input_projection_weight`` applied with torch.matmul) has no nn.Linear. Its weight P, shape
(vision hidden, text hidden), is declared a `MatmulWeight`: the engine quantizes it as the Linear it
computes (weight P.T, its input the output of ``mm_soft_emb_norm``), so groups run along P's first
axis (the input features), every method applies, and the report, the weight cache and the saved
codes name it by its own state_dict key. AWQ folds ``mm_soft_emb_norm`` (a (1 + w) RMSNorm whose
output reaches nothing but the matmul) into it exactly. The packed export cannot make it a packed
Linear; it is exported dense, holding its quantized values (`export.py` reports it).
PaliGemma's projector is one Linear (``model.multi_modal_projector.linear``).
"""

from __future__ import annotations

from ..spec import BlockSpec, Family, Fold, MatmulWeight, Part
from .blocks import CLIP_BLOCK

_ROOTS = {"vit": ("model.vision_tower",), "connector": ("model.multi_modal_projector",),
          "llm": ("model.language_model", "lm_head")}

_GEMMA3_PROJECTION = "model.multi_modal_projector.mm_input_projection_weight"
_GEMMA3_NORM = "model.multi_modal_projector.mm_soft_emb_norm"
GEMMA3_CONNECTOR = Part(
    "connector", matmuls={_GEMMA3_PROJECTION: MatmulWeight("proj.fc", input_from=_GEMMA3_NORM)},
    folds=(Fold(_GEMMA3_NORM, (_GEMMA3_PROJECTION,), weight_offset=1.0),),
)


def _parts(connector: Part, text_block: BlockSpec) -> tuple[Part, ...]:
    parts = [Part("vit", stack="model.vision_tower.encoder.layers", block=CLIP_BLOCK, config="vision_config"),
             connector]
    parts += [
        Part("llm", stack="model.language_model.layers", block=text_block, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ]
    return tuple(parts)


def gemma3(text_block: BlockSpec) -> Family:
    return Family(name="gemma3", roots=_ROOTS, parts=_parts(GEMMA3_CONNECTOR, text_block), prompt_style="chat")


def paligemma(name: str, text_block: BlockSpec) -> Family:
    # No chat template on the hub checkpoints: "generic" prompts are the bare question and answer.
    connector = Part("connector", linears={"model.multi_modal_projector.linear": "proj.fc"})
    return Family(name=name, roots=_ROOTS, parts=_parts(connector, text_block), prompt_style="generic")


__all__ = ["gemma3", "paligemma"]
