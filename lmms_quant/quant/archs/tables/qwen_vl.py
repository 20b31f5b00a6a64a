"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the connector lives inside the vision module.

``model.visual.blocks`` are the vision encoder; ``model.visual.merger`` (and Qwen3-VL's
``model.visual.deepstack_merger_list``) map 2 x 2 neighbouring patches to one LM token: they are
the connector, although they sit under ``model.visual`` (components take the longest root).

Folds, and why only these:
- vision blocks: norm1 -> the fused qkv (LayerNorm in Qwen2-VL / Qwen3-VL, plain-weight RMSNorm in
  Qwen2.5-VL); the v rows of qkv (rows [2/3, 1), with their bias) -> proj, because attention is
  linear in v; norm2 -> the MLP input. Qwen2.5-VL's MLP is gated SiLU, silu(gate x) * up x, linear in
  up's output, so up -> down folds; Qwen2-VL's QuickGELU fc1 -> fc2 and Qwen3-VL's GELU
  linear_fc1 -> linear_fc2 do not.
- merger: its norm acts per patch (width d) before 4 patches are concatenated into the first
  Linear's input (width 4d); a per-channel scale of that input would need the same value in all 4
  copies, which AWQ's search does not enforce, so nothing folds there. Qwen3-VL's DeepStack mergers
  normalise after the concatenation (use_postshuffle_norm): norm -> linear_fc1 folds exactly.
  GELU between the merger's Linears: no fold.
- language model: Llama names (Qwen2/Qwen3 decoders), see blocks.LLAMA_BLOCK.
"""

from __future__ import annotations

from ..spec import BlockSpec, Family, Fold, Part
from .blocks import LLAMA_BLOCK

_ATTN = {"attn.qkv": "attn.qkv", "attn.proj": "attn.out"}
_ATTN_FOLDS = (
    Fold("norm1", ("attn.qkv",)),
    Fold("attn.qkv", ("attn.proj",), prev_rows=(2, 3)),
)

QWEN2_VL_VISION_BLOCK = BlockSpec(
    linears={**_ATTN, "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    folds=_ATTN_FOLDS + (Fold("norm2", ("mlp.fc1",)),),  # QuickGELU between fc1 and fc2
)

QWEN2_5_VL_VISION_BLOCK = BlockSpec(
    linears={**_ATTN, "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"},
    folds=_ATTN_FOLDS + (
        Fold("norm2", ("mlp.gate_proj", "mlp.up_proj")),
        Fold("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

QWEN3_VL_VISION_BLOCK = BlockSpec(
    linears={**_ATTN, "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2"},
    folds=_ATTN_FOLDS + (Fold("norm2", ("mlp.linear_fc1",)),),  # GELU between the two
)

QWEN3_VL_DEEPSTACK_BLOCK = BlockSpec(
    linears={"linear_fc1": "proj.fc1", "linear_fc2": "proj.fc2"},
    folds=(Fold("norm", ("linear_fc1",)),),
)

_LLM_PARTS = (
    Part("llm", stack="model.language_model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
         config="text_config"),
    Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
)
_ROOTS = {"vit": ("model.visual",), "connector": ("model.visual.merger",),
          "llm": ("model.language_model", "lm_head")}


def _qwen_vl(name: str, vision_block: BlockSpec, merger: dict[str, str]) -> Family:
    return Family(
        name=name, roots=_ROOTS,
        parts=(Part("vit", stack="model.visual.blocks", block=vision_block, config="vision_config"),
               Part("connector", linears=merger)) + _LLM_PARTS,
        prompt_style="chat",
    )


_MERGER = {"model.visual.merger.mlp.0": "proj.fc1", "model.visual.merger.mlp.2": "proj.fc2"}
QWEN2_VL = _qwen_vl("qwen2_vl", QWEN2_VL_VISION_BLOCK, _MERGER)
QWEN2_5_VL = _qwen_vl("qwen2_5_vl", QWEN2_5_VL_VISION_BLOCK, _MERGER)

QWEN3_VL = Family(
    name="qwen3_vl",
    roots={**_ROOTS, "connector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
    parts=(
        Part("vit", stack="model.visual.blocks", block=QWEN3_VL_VISION_BLOCK, config="vision_config"),
        # One DeepStack merger per entry of deepstack_visual_indexes: a stack, so layer_group thirds
        # apply to it as to any stack.
        Part("connector", stack="model.visual.deepstack_merger_list", block=QWEN3_VL_DEEPSTACK_BLOCK,
             config="vision_config"),
        Part("connector", linears={"model.visual.merger.linear_fc1": "proj.fc1",
                                   "model.visual.merger.linear_fc2": "proj.fc2"}),
    ) + _LLM_PARTS,
    prompt_style="chat",
)

__all__ = ["QWEN2_5_VL", "QWEN2_VL", "QWEN3_VL"]
