"""InternVL, HF-native (``InternVLForConditionalGeneration``, e.g. OpenGVLab/InternVL3-1B-hf).

Vision blocks (InternViT): layernorm_before -> q/k/v (the optional q/k norms act after the
projections), v_proj -> projection_layer (attention is linear in v; the layer scale lambda_1 acts
after the projection), layernorm_after -> fc1 (GELU before fc2: no fold). The norms are LayerNorm
or RMSNorm (norm_type); both scale by a plain weight.

Connector: ``model.multi_modal_projector``: LayerNorm over the pixel-shuffled features (width
4 x vision hidden), linear_1, GELU, linear_2. The norm is applied after the shuffle, so
layer_norm -> linear_1 folds exactly; linear_1 -> linear_2 does not (GELU).
"""

from __future__ import annotations

from ..spec import BlockSpec, Family, Fold, Part
from .blocks import LLAMA_BLOCK

INTERNVIT_BLOCK = BlockSpec(
    linears={
        "attention.q_proj": "attn.q",
        "attention.k_proj": "attn.k",
        "attention.v_proj": "attn.v",
        "attention.projection_layer": "attn.out",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    folds=(
        Fold("layernorm_before", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
        Fold("attention.v_proj", ("attention.projection_layer",)),
        Fold("layernorm_after", ("mlp.fc1",)),
    ),
)

INTERNVL = Family(
    name="internvl",
    roots={"vit": ("model.vision_tower",), "connector": ("model.multi_modal_projector",),
           "llm": ("model.language_model", "lm_head")},
    parts=(
        Part("vit", stack="model.vision_tower.encoder.layer", block=INTERNVIT_BLOCK, config="vision_config"),
        Part("connector", linears={"model.multi_modal_projector.linear_1": "proj.fc1",
                                   "model.multi_modal_projector.linear_2": "proj.fc2"},
             folds=(Fold("model.multi_modal_projector.layer_norm", ("model.multi_modal_projector.linear_1",)),)),
        Part("llm", stack="model.language_model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ),
    prompt_style="chat",
)

__all__ = ["INTERNVL", "INTERNVIT_BLOCK"]
