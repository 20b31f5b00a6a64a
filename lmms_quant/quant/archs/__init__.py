"""Architectures as data: which weights form each component, their blocks, roles and AWQ folds.

A `Family` table lists, in forward order, the *parts* of a model: block stacks (an nn.ModuleList
of identical blocks, each described by a `BlockSpec`) and non-block Linears. Adding a model is
adding a table (``tables/``) and a registry entry (``tables/__init__.py``). Models without a
table go through `generic_family`, which finds the components by the usual Hugging Face attribute
names and the roles by keywords (no AWQ folds there), and lists what it could not place.

Layout: ``spec`` (the dataclasses), ``resolve`` (binding a table to a model), ``select`` (a plan's
units), ``generic`` (the fallback), ``detect`` (table for a model), ``tables`` (the data).

Decisions (documented because they shape what a plan selects):

- Components: ``vit`` (vision encoder), ``connector`` (BLIP-2/InstructBLIP: Q-Former, its query
  tokens and the language projection; LLaVA family: the multi-modal projector; Qwen-VL: the patch
  merger(s); Idefics3: the modality projection; InternVL/PaliGemma/Gemma 3: the projector),
  ``llm`` (the language model). A parameter belongs to the component with the longest root that
  holds it (Qwen's merger lies inside ``model.visual``).
- Non-block Linears of a component (``language_projection``, the LLaVA projector) form one unit of
  their own that has no depth: ``layer_group`` front/middle/end select blocks of stacks only, so these
  units are selected by ``layer_group=all`` alone; their role kind is ``proj``, selected by
  ``layer_type=all`` alone.
- ``layer_group`` thirds are taken per stack ([0, n//3), [n//3, 2n//3), [2n//3, n)); T5's encoder and
  decoder are two stacks, each split into thirds.
- ``lm_head`` (tied to the input embeddings in OPT) is a head part, quantized only with
  ``include=lm_head``; embeddings, the conv patch embedding, norms and biases are never quantized.
- A vision block whose output the model never reads (LLaVA's ``vision_feature_layer=-2`` leaves the
  last CLIP layer unused) is still quantized with its component, and flagged ``feeds_output=False``.
- AWQ folds are listed only where they are exact (see `Fold`); post-LN blocks (Q-Former) fold only
  value -> output projections; Gemma's (1 + w) norms fold with ``weight_offset=1``.
- A weight the model applies with torch.matmul (Gemma 3's projector) is declared a ``MatmulWeight``
  of a non-block part; `resolve` gives it a ``MatmulView``, an nn.Linear over the parameter's own
  storage transposed, so the methods, hooks and report see a Linear while the model keeps its modules
  and state_dict names (the view is run on its input module's output while statistics are collected).
- Every Linear of a model with a table is covered by it or named as a task head outside the
  components; anything else fails resolution by name, so nothing is silently left unquantized.
"""

from .detect import detect_family
from .generic import CONNECTOR_NAMES, LLM_NAMES, VIT_NAMES, generic_family, guess_role
from .resolve import Arch, FoldSite, LinearSite, MatmulView, UnitSite, is_linear, resolve, stored_weight
from .select import Target, Unit, select, third_of
from .spec import CONDITIONS, ArchitectureError, BlockSpec, Family, Fold, MatmulWeight, Part
from .tables import (BLIP2_ITM, BLIP2_OPT, BLIP2_T5, FAMILIES, GEMMA3, IDEFICS3, INSTRUCTBLIP, INSTRUCTBLIP_T5,
                     INTERNVL, LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, PALIGEMMA, PALIGEMMA2, QWEN2_5_VL, QWEN2_VL,
                     QWEN3_VL, REGISTRY, SMOLVLM)
from .tables.blip2 import BLIP2_VIT_BLOCK, OPT_BLOCK, QFORMER_BLOCK, T5_DECODER_BLOCK, T5_ENCODER_BLOCK
from .tables.blocks import CLIP_BLOCK, GEMMA2_BLOCK, GEMMA_BLOCK, LLAMA_BLOCK

__all__ = [
    "ArchitectureError", "Arch", "BLIP2_ITM", "BLIP2_OPT", "BLIP2_T5", "BLIP2_VIT_BLOCK", "BlockSpec", "CLIP_BLOCK",
    "CONDITIONS", "CONNECTOR_NAMES", "FAMILIES", "Family", "Fold", "FoldSite", "GEMMA2_BLOCK", "GEMMA3", "GEMMA_BLOCK",
    "IDEFICS3", "INSTRUCTBLIP", "INSTRUCTBLIP_T5", "INTERNVL", "LLAMA_BLOCK", "LLAVA", "LLAVA_NEXT", "LLAVA_ONEVISION",
    "LLM_NAMES", "LinearSite", "MatmulView", "MatmulWeight", "OPT_BLOCK", "PALIGEMMA", "PALIGEMMA2", "Part", "QFORMER_BLOCK", "QWEN2_5_VL",
    "QWEN2_VL", "QWEN3_VL", "REGISTRY", "SMOLVLM", "T5_DECODER_BLOCK", "T5_ENCODER_BLOCK", "Target", "Unit",
    "UnitSite", "VIT_NAMES", "detect_family", "generic_family", "guess_role", "is_linear", "resolve", "select",
    "stored_weight", "third_of",
]
