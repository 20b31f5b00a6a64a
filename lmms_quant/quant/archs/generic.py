"""The fallback for models without a table: components by attribute name, roles by keyword.

It finds block stacks as ModuleLists of one block class, guesses each Linear's role from its path
(``other.<leaf>`` when no keyword fits: selected only by layer_type=all) and lists the Linears it
could place in no component as ``Family.unclassified`` (never quantized; `resolve` warns and
``lmms-quant inspect`` says so). It lists no AWQ folds: AWQ then rounds without scaling.
"""

from __future__ import annotations

import torch.nn as nn

from ..recipe import COMPONENTS
from .resolve import is_linear
from .spec import ArchitectureError, BlockSpec, Family, Part

VIT_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
CONNECTOR_NAMES = ("qformer", "multi_modal_projector", "mm_projector", "language_projection", "connector",
                   "projector", "resampler", "merger")
LLM_NAMES = ("language_model", "text_model", "llm")
_ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "qkv_proj", "query", "key", "value",
                "q", "k", "v", "o", "c_attn", "wqkv", "projection"}


def guess_role(path: str) -> str:
    """A role from a Linear's path, by the keywords Hugging Face models use."""
    low = path.lower()
    leaf = path.split(".")[-1]
    if "attn" in low or "attention" in low or leaf in _ATTN_LEAVES:
        kind = "cross_attn" if ("cross" in low or "encdec" in low) else "attn"
        return f"{kind}.{leaf}"
    if any(k in low for k in ("mlp", "ffn", "feed_forward", "fc1", "fc2", "gate_proj", "up_proj", "down_proj",
                              "intermediate", "output", "densereludense", "wi", "wo", "w1", "w2", "w3")):
        return f"mlp.{leaf}"
    return f"other.{leaf}"


def _find_roots(model, names: tuple[str, ...], taken: list[str]) -> list[str]:
    found = []
    for path, _ in model.named_modules():
        if not path or path.split(".")[-1] not in names:
            continue
        if any(path == r or path.startswith(r + ".") for r in found + taken):
            continue
        found.append(path)
    return found


def _stacks_under(model, root: str) -> list[str]:
    stacks = []
    for path, module in model.named_modules():
        if not (path == root or path.startswith(root + ".")) or not isinstance(module, nn.ModuleList):
            continue
        if any(path.startswith(s + ".") for s in stacks) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and any(is_linear(m) for m in module[0].modules()):
            stacks.append(path)
    return stacks


def generic_family(model) -> Family:
    """Components by attribute name, block stacks as ModuleLists of one block class, roles by keyword."""
    taken: list[str] = []
    roots: dict[str, tuple[str, ...]] = {}
    for comp, names in (("vit", VIT_NAMES), ("connector", CONNECTOR_NAMES), ("llm", LLM_NAMES)):
        found = _find_roots(model, names, taken)
        if found:
            roots[comp] = tuple(found)
            taken += found
    if not roots:
        raise ArchitectureError(
            f"{type(model).__name__}: no architecture table and no vision_tower/vision_model, "
            f"multi_modal_projector/qformer or language_model module found; add a table in lmms_quant/quant/archs/tables"
        )
    modules = dict(model.named_modules())
    heads = [p for p in ("lm_head", *(f"{r}.lm_head" for r in roots.get("llm", ()))) if is_linear(modules.get(p))]
    if "llm" in roots and heads and heads[0] == "lm_head":
        roots["llm"] = roots["llm"] + ("lm_head",)
    text_cfg = getattr(model.config, "text_config", model.config)
    llm_mask = None if getattr(text_cfg, "is_encoder_decoder", False) else "attention_mask"
    parts = []
    for comp in COMPONENTS:
        mask = llm_mask if comp == "llm" else None
        covered: set[str] = set(heads)
        for root in roots.get(comp, ()):
            for stack in _stacks_under(model, root):
                names: dict[str, str] = {}
                for block in modules[stack]:
                    for sub, m in block.named_modules():
                        if sub and is_linear(m):
                            names[sub] = guess_role(sub)
                parts.append(Part(comp, stack=stack, block=BlockSpec(linears=names, optional=frozenset(names)),
                                  token_mask=mask))
                covered |= {f"{stack}.{sub}" for sub, m in modules[stack].named_modules() if is_linear(m)}
        extras = {p: "proj." + p.split(".")[-1] for root in roots.get(comp, ())
                  for p, m in model.named_modules()
                  if is_linear(m) and (p == root or p.startswith(root + ".")) and p not in covered}
        if extras:
            parts.append(Part(comp, linears=extras, token_mask=mask))
        if comp == "llm" and heads:
            parts.append(Part("llm", linears={heads[0]: "head.lm"}, token_mask=mask, include="lm_head"))
    placed = [r for rs in roots.values() for r in rs]
    unclassified = tuple(p for p, m in model.named_modules()
                         if is_linear(m) and not any(p == r or p.startswith(r + ".") for r in placed))
    return Family(name=f"generic:{type(model).__name__}", roots=roots, parts=tuple(parts),
                  prompt_style="generic", strict=False, unclassified=unclassified)


__all__ = ["generic_family", "guess_role"]
