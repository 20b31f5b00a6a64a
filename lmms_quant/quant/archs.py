"""Architectures as data: which weights form each component, their blocks, roles and AWQ folds.

A `Family` table lists, in forward order, the *parts* of a model: block stacks (an nn.ModuleList
of identical blocks, each described by a `BlockSpec`) and non-block Linears. Adding a model is
adding a table. Models without a table go through `generic_family`, which finds the components by
the usual Hugging Face attribute names and the roles by keywords (no AWQ folds there).

Decisions (documented because they shape what a plan selects):

- Components: ``vit`` (vision encoder), ``connector`` (BLIP-2: Q-Former, its query tokens and the
  language projection; LLaVA: the multi-modal projector), ``llm`` (the language model).
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
  value -> output projections.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.nn as nn

from .quantizer import QuantGrid
from .recipe import COMPONENTS, LAYER_GROUPS, LAYER_TYPES, Recipe, RecipeError


class ArchitectureError(RuntimeError):
    """A model does not match its architecture table (e.g. a transformers version renamed modules)."""


@dataclass(frozen=True)
class Fold:
    """AWQ may scale the input columns of ``linears`` by s and divide ``prev`` by s: exact because
    ``prev``'s output reaches the linears only through ops that commute with a positive per-channel
    scale. ``prev`` is a LayerNorm/RMSNorm (weight and bias divided) or a Linear (output rows and bias
    divided; ``prev_rows=(i, n)`` restricts that to the i-th of n equal row chunks, e.g. the v part of a
    fused qkv). ``when`` names a config predicate in CONDITIONS that must hold."""

    prev: str
    linears: tuple[str, ...]
    prev_rows: tuple[int, int] | None = None
    when: str | None = None
    # A bias of those rows kept outside ``prev`` (older BLIP-2 code adds a separate v_bias); divided too.
    prev_bias: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    """Every Linear of one block (path inside the block -> role) and its AWQ folds.

    A role is ``<kind>.<name>``; kind ``attn``/``cross_attn`` is selected by ``layer_type=attn``,
    ``mlp`` by ``layer_type=mlp``. ``optional`` Linears exist only in some blocks or configs.
    ``masks`` overrides the part's token mask for Linears whose input is another sequence."""

    linears: Mapping[str, str]
    optional: frozenset = frozenset()
    folds: tuple[Fold, ...] = ()
    masks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """A block stack (``stack`` + ``block``) or a set of non-block Linears (``linears``: path -> role)."""

    component: str
    stack: str | None = None
    block: BlockSpec | None = None
    linears: Mapping[str, str] | None = None
    token_mask: str | None = None  # key of the batch mask that marks real (non-padding) tokens
    include: str | None = None  # a head: quantized only when plan.include names it
    config: str | None = None  # sub-config of model.config that fold conditions read


@dataclass(frozen=True)
class Family:
    name: str
    roots: Mapping[str, tuple[str, ...]]  # component -> module/parameter paths it owns
    parts: tuple[Part, ...]  # forward order
    prompt_style: str
    strict: bool = True  # every Linear under a component root must be covered by the table


def _opt_pre_ln(cfg) -> bool:
    return bool(getattr(cfg, "do_layer_norm_before", True))


def _opt_relu(cfg) -> bool:
    # relu(x / s) = relu(x) / s for s > 0; GELU has no such property.
    return getattr(cfg, "activation_function", "relu") == "relu"


def _t5_relu(cfg) -> bool:
    return getattr(cfg, "dense_act_fn", "relu") == "relu"


CONDITIONS = {"opt_pre_ln": _opt_pre_ln, "opt_relu": _opt_relu, "t5_relu": _t5_relu}

# --------------------------------------------------------------------------- block tables

BLIP2_VIT_BLOCK = BlockSpec(
    linears={
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.out",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    folds=(
        Fold("layer_norm1", ("self_attn.qkv",)),
        # qkv rows are [q; k; v]; the v chunk (and its bias) feeds projection linearly.
        Fold("self_attn.qkv", ("self_attn.projection",), prev_rows=(2, 3), prev_bias="self_attn.v_bias"),
        Fold("layer_norm2", ("mlp.fc1",)),
        # fc1 -> fc2 has GELU in between: not exact, not folded.
    ),
)

_QF_CROSS = (
    "crossattention.attention.query", "crossattention.attention.key", "crossattention.attention.value",
    "crossattention.output.dense",
)
QFORMER_BLOCK = BlockSpec(
    linears={
        "attention.attention.query": "attn.q",
        "attention.attention.key": "attn.k",
        "attention.attention.value": "attn.v",
        "attention.output.dense": "attn.out",
        "crossattention.attention.query": "cross_attn.q",
        "crossattention.attention.key": "cross_attn.k",
        "crossattention.attention.value": "cross_attn.v",
        "crossattention.output.dense": "cross_attn.out",
        "intermediate_query.dense": "mlp.fc1",
        "output_query.dense": "mlp.fc2",
        # The text feed-forward exists only with use_qformer_text_input (retrieval model).
        "intermediate.dense": "mlp.text_fc1",
        "output.dense": "mlp.text_fc2",
    },
    # Cross-attention exists every cross_attention_frequency layers.
    optional=frozenset(_QF_CROSS + ("intermediate.dense", "output.dense")),
    # Post-LN BERT: a LayerNorm output is also the residual stream, so nothing folds into a norm.
    folds=(
        Fold("attention.attention.value", ("attention.output.dense",)),
        Fold("crossattention.attention.value", ("crossattention.output.dense",)),
    ),
)

OPT_BLOCK = BlockSpec(
    linears={
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.out",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    },
    folds=(
        Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), when="opt_pre_ln"),
        Fold("self_attn.v_proj", ("self_attn.out_proj",)),
        Fold("final_layer_norm", ("fc1",), when="opt_pre_ln"),
        Fold("fc1", ("fc2",), when="opt_relu"),
    ),
)


def _t5_block(decoder: bool) -> BlockSpec:
    ff = "layer.2" if decoder else "layer.1"
    linears = {
        "layer.0.SelfAttention.q": "attn.q",
        "layer.0.SelfAttention.k": "attn.k",
        "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.out",
        f"{ff}.DenseReluDense.wi_0": "mlp.gate",
        f"{ff}.DenseReluDense.wi_1": "mlp.up",
        f"{ff}.DenseReluDense.wi": "mlp.fc1",
        f"{ff}.DenseReluDense.wo": "mlp.down",
    }
    folds = [
        Fold("layer.0.layer_norm", ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v")),
        Fold("layer.0.SelfAttention.v", ("layer.0.SelfAttention.o",)),
        # Gated (Flan-T5): act(wi_0 x) * wi_1 x is linear in wi_1's output.
        Fold(f"{ff}.layer_norm", (f"{ff}.DenseReluDense.wi_0", f"{ff}.DenseReluDense.wi_1")),
        Fold(f"{ff}.DenseReluDense.wi_1", (f"{ff}.DenseReluDense.wo",)),
        # Original T5: relu(wi x).
        Fold(f"{ff}.layer_norm", (f"{ff}.DenseReluDense.wi",)),
        Fold(f"{ff}.DenseReluDense.wi", (f"{ff}.DenseReluDense.wo",), when="t5_relu"),
    ]
    masks = {}
    if decoder:
        linears.update({
            "layer.1.EncDecAttention.q": "cross_attn.q",
            "layer.1.EncDecAttention.k": "cross_attn.k",
            "layer.1.EncDecAttention.v": "cross_attn.v",
            "layer.1.EncDecAttention.o": "cross_attn.out",
        })
        # k/v read the encoder output, one tensor shared by all decoder blocks: no norm to fold into.
        folds += [
            Fold("layer.1.layer_norm", ("layer.1.EncDecAttention.q",)),
            Fold("layer.1.EncDecAttention.v", ("layer.1.EncDecAttention.o",)),
        ]
        masks = {"layer.1.EncDecAttention.k": "attention_mask", "layer.1.EncDecAttention.v": "attention_mask"}
    optional = frozenset(f"{ff}.DenseReluDense.{n}" for n in ("wi_0", "wi_1", "wi"))
    return BlockSpec(linears=linears, optional=optional, folds=tuple(folds), masks=masks)


T5_ENCODER_BLOCK = _t5_block(decoder=False)
T5_DECODER_BLOCK = _t5_block(decoder=True)

CLIP_BLOCK = BlockSpec(
    linears={
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.out_proj": "attn.out",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    folds=(
        Fold("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Fold("self_attn.v_proj", ("self_attn.out_proj",)),
        Fold("layer_norm2", ("mlp.fc1",)),
        # fc1 -> fc2 has quick-GELU/GELU in between: not exact, not folded.
    ),
)

LLAMA_BLOCK = BlockSpec(
    linears={
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
        "self_attn.o_proj": "attn.out",
        "mlp.gate_proj": "mlp.gate",
        "mlp.up_proj": "mlp.up",
        "mlp.down_proj": "mlp.down",
    },
    folds=(
        Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # Exact when v and o have matching widths; with grouped-query attention they do not, and the
        # fold is dropped at resolution (a shared per-KV-head scale would be needed).
        Fold("self_attn.v_proj", ("self_attn.o_proj",)),
        Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Fold("mlp.up_proj", ("mlp.down_proj",)),  # silu(gate x) * up x is linear in up's output
    ),
)

# --------------------------------------------------------------------------- family tables

_BLIP2_VISION_AND_QFORMER = (
    Part("vit", stack="vision_model.encoder.layers", block=BLIP2_VIT_BLOCK, config="vision_config"),
    Part("connector", stack="qformer.encoder.layer", block=QFORMER_BLOCK, config="qformer_config"),
)

BLIP2_OPT = Family(
    name="blip2_opt",
    roots={"vit": ("vision_model",), "connector": ("query_tokens", "qformer", "language_projection"),
           "llm": ("language_model",)},
    parts=_BLIP2_VISION_AND_QFORMER + (
        Part("connector", linears={"language_projection": "proj.language"}),
        Part("llm", stack="language_model.model.decoder.layers", block=OPT_BLOCK, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"language_model.lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ),
    prompt_style="blip2_causal",
)

BLIP2_T5 = Family(
    name="blip2_t5",
    roots=BLIP2_OPT.roots,
    parts=_BLIP2_VISION_AND_QFORMER + (
        Part("connector", linears={"language_projection": "proj.language"}),
        Part("llm", stack="language_model.encoder.block", block=T5_ENCODER_BLOCK, token_mask="attention_mask",
             config="text_config"),
        Part("llm", stack="language_model.decoder.block", block=T5_DECODER_BLOCK, token_mask="decoder_mask",
             config="text_config"),
        Part("llm", linears={"language_model.lm_head": "head.lm"}, token_mask="decoder_mask", include="lm_head"),
    ),
    prompt_style="blip2_seq2seq",
)

BLIP2_ITM = Family(
    name="blip2_itm",
    # vision_projection / text_projection / itm_head are task heads outside every component.
    roots={"vit": ("vision_model",), "connector": ("query_tokens", "qformer", "embeddings")},
    parts=_BLIP2_VISION_AND_QFORMER,
    prompt_style="blip2_itm",
)

LLAVA = Family(
    name="llava",
    roots={"vit": ("model.vision_tower",), "connector": ("model.multi_modal_projector",),
           "llm": ("model.language_model", "lm_head")},
    parts=(
        Part("vit", stack="model.vision_tower.encoder.layers", block=CLIP_BLOCK, config="vision_config"),
        Part("connector", linears={"model.multi_modal_projector.linear_1": "proj.fc1",
                                   "model.multi_modal_projector.linear_2": "proj.fc2"}),
        Part("llm", stack="model.language_model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ),
    prompt_style="llava",
)

FAMILIES = {f.name: f for f in (BLIP2_OPT, BLIP2_T5, BLIP2_ITM, LLAVA)}


def _has_class(model, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(model).__mro__)


def detect_family(model) -> Family:
    """The table for ``model``, or a generic description found by module names."""
    cfg = model.config
    text_type = getattr(getattr(cfg, "text_config", None), "model_type", None)
    vision_type = getattr(getattr(cfg, "vision_config", None), "model_type", None)
    if _has_class(model, "Blip2ForConditionalGeneration"):
        if text_type == "opt":
            return BLIP2_OPT
        if text_type == "t5":
            return BLIP2_T5
    if _has_class(model, "Blip2ForImageTextRetrieval"):
        return BLIP2_ITM
    if (_has_class(model, "LlavaForConditionalGeneration") and text_type in ("llama", "mistral", "qwen2")
            and vision_type in ("clip_vision_model", "siglip_vision_model")):
        return LLAVA
    return generic_family(model)


# --------------------------------------------------------------------------- generic fallback

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


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear)


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
        if len(kinds) == 1 and any(_is_linear(m) for m in module[0].modules()):
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
            f"multi_modal_projector/qformer or language_model module found; add a table in lmms_quant/quant/archs.py"
        )
    modules = dict(model.named_modules())
    heads = [p for p in ("lm_head", *(f"{r}.lm_head" for r in roots.get("llm", ()))) if _is_linear(modules.get(p))]
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
                        if sub and _is_linear(m):
                            names[sub] = guess_role(sub)
                parts.append(Part(comp, stack=stack, block=BlockSpec(linears=names, optional=frozenset(names)),
                                  token_mask=mask))
                covered |= {f"{stack}.{sub}" for sub, m in modules[stack].named_modules() if _is_linear(m)}
        extras = {p: "proj." + p.split(".")[-1] for root in roots.get(comp, ())
                  for p, m in model.named_modules()
                  if _is_linear(m) and (p == root or p.startswith(root + ".")) and p not in covered}
        if extras:
            parts.append(Part(comp, linears=extras, token_mask=mask))
        if comp == "llm" and heads:
            parts.append(Part("llm", linears={heads[0]: "head.lm"}, token_mask=mask, include="lm_head"))
    return Family(name=f"generic:{type(model).__name__}", roots=roots, parts=tuple(parts),
                  prompt_style="generic", strict=False)


# --------------------------------------------------------------------------- resolution against a model


@dataclass
class LinearSite:
    name: str
    module: nn.Linear
    role: str
    component: str
    stack: str | None
    block: int | None
    token_mask: str | None
    feeds_output: bool = True

    @property
    def kind(self) -> str | None:
        """``attn`` / ``mlp`` for layer_type selection; None for projections and heads."""
        kind = self.role.split(".")[0]
        return {"attn": "attn", "cross_attn": "attn", "mlp": "mlp"}.get(kind)


@dataclass
class FoldSite:
    prev_name: str
    prev: nn.Module
    rows: slice | None  # rows of prev that feed the linears (None: all)
    linears: tuple[str, ...]  # full names
    extra_bias: nn.Parameter | None = None  # a separate bias of those rows (see Fold.prev_bias)


@dataclass
class UnitSite:
    """One block of a stack, or one set of non-block Linears: the step of sequential calibration."""

    name: str
    component: str
    stack: str | None
    block: int | None
    n_blocks: int | None
    linears: list[LinearSite]
    folds: list[FoldSite]
    include: str | None = None
    dropped_folds: list[str] = field(default_factory=list)


@dataclass
class Arch:
    family: Family
    units: list[UnitSite]

    @property
    def components(self) -> tuple[str, ...]:
        present = {u.component for u in self.units if u.include is None and u.linears}
        return tuple(c for c in COMPONENTS if c in present)

    def component_of(self, param_name: str) -> str:
        for comp, roots in self.family.roots.items():
            if any(param_name == r or param_name.startswith(r + ".") for r in roots):
                return comp
        return "other"


def _get(modules: Mapping[str, nn.Module], path: str, family: Family) -> nn.Module:
    if path not in modules:
        raise ArchitectureError(f"{family.name}: the table names {path!r}, which the model does not have")
    return modules[path]


def _used_vision_blocks(model, n_blocks: int) -> int:
    """How many vision blocks feed the model's output, per config.vision_feature_layer (LLaVA)."""
    layer = getattr(model.config, "vision_feature_layer", None)
    if layer is None:
        return n_blocks
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    # hidden_states[k] is the output of block k-1 (index 0 is the embeddings).
    return max((k if k >= 0 else n_blocks + 1 + k) for k in layers)


def _fold_sites(spec: BlockSpec, block_path: str, block_modules: Mapping[str, nn.Module], present: set[str],
                cfg, family: Family) -> tuple[list[FoldSite], list[str]]:
    sites, dropped = [], []
    for fold in spec.folds:
        label = f"{block_path}.{fold.prev} -> {', '.join(fold.linears)}"
        if any(lin not in present for lin in fold.linears) or fold.prev not in block_modules:
            continue  # an alternative of the table that this config does not have
        if fold.when and not CONDITIONS[fold.when](cfg):
            dropped.append(f"{label}: not exact for this config ({fold.when} is false)")
            continue
        prev = block_modules[fold.prev]
        consumers = [block_modules[lin] for lin in fold.linears]
        if _is_linear(prev):
            n_rows = prev.out_features
            rows = None
            if fold.prev_rows is not None:
                index, chunks = fold.prev_rows
                size = n_rows // chunks
                rows = slice(index * size, (index + 1) * size)
                n_rows = size
        else:
            weight = getattr(prev, "weight", None)
            if weight is None or weight.dim() != 1:
                raise ArchitectureError(f"{family.name}: fold source {block_path}.{fold.prev} is not a norm with a weight")
            n_rows, rows = weight.shape[0], None
        if any(c.in_features != n_rows for c in consumers):
            dropped.append(f"{label}: widths differ ({n_rows} vs {[c.in_features for c in consumers]})")
            continue
        extra_bias = None
        if fold.prev_bias:
            owner, _, attr = fold.prev_bias.rpartition(".")
            extra_bias = getattr(block_modules.get(owner), attr, None)
            if extra_bias is not None and getattr(extra_bias, "shape", None) != (n_rows,):
                dropped.append(f"{label}: {fold.prev_bias} is not a bias of the folded rows")
                continue
        sites.append(FoldSite(f"{block_path}.{fold.prev}", prev, rows,
                              tuple(f"{block_path}.{name}" for name in fold.linears), extra_bias))
    return sites, dropped


def resolve(model, family: Family | None = None) -> Arch:
    """Bind a family table to a model: every unit with its Linears, roles and exact folds."""
    family = family or detect_family(model)
    modules = dict(model.named_modules())
    units: list[UnitSite] = []
    covered: set[str] = set()
    for part in family.parts:
        cfg = getattr(model.config, part.config, model.config) if part.config else model.config
        if part.stack is not None:
            stack = _get(modules, part.stack, family)
            n_blocks = len(stack)
            used = _used_vision_blocks(model, n_blocks) if part.component == "vit" else n_blocks
            for index, block in enumerate(stack):
                block_path = f"{part.stack}.{index}"
                block_modules = dict(block.named_modules())
                actual = {p for p, m in block_modules.items() if p and _is_linear(m)}
                unknown = actual - set(part.block.linears)
                if unknown and family.strict:
                    raise ArchitectureError(
                        f"{family.name}: {block_path} has Linears the table does not describe: {sorted(unknown)}")
                missing = set(part.block.linears) - actual - part.block.optional
                if missing:
                    raise ArchitectureError(f"{family.name}: {block_path} lacks {sorted(missing)} named by the table")
                present = actual & set(part.block.linears)
                sites = [
                    LinearSite(f"{block_path}.{p}", block_modules[p], role, part.component, part.stack, index,
                               part.block.masks.get(p, part.token_mask), feeds_output=index < used)
                    for p, role in part.block.linears.items() if p in present
                ]
                folds, dropped = _fold_sites(part.block, block_path, block_modules, present, cfg, family)
                units.append(UnitSite(block_path, part.component, part.stack, index, n_blocks, sites, folds,
                                      dropped_folds=dropped))
                covered |= {s.name for s in sites}
        else:
            sites = []
            for path, role in part.linears.items():
                module = _get(modules, path, family)
                if not _is_linear(module):
                    raise ArchitectureError(f"{family.name}: {path} is a {type(module).__name__}, not a Linear")
                sites.append(LinearSite(path, module, role, part.component, None, None, part.token_mask))
            name = os.path.commonprefix([s.name.split(".") for s in sites])
            units.append(UnitSite(".".join(name) or sites[0].name, part.component, None, None, None, sites, [],
                                  include=part.include))
            covered |= {s.name for s in sites}
    arch = Arch(family, units)
    if family.strict:
        stray = [p for p, m in model.named_modules()
                 if _is_linear(m) and p not in covered and arch.component_of(p) != "other"]
        if stray:
            raise ArchitectureError(f"{family.name}: Linears inside a component that the table does not cover: {stray}")
    return arch


# --------------------------------------------------------------------------- selection by a plan


def third_of(index: int, n_blocks: int) -> str:
    if index < n_blocks // 3:
        return "front"
    if index < 2 * n_blocks // 3:
        return "middle"
    return "end"


@dataclass
class Target:
    site: LinearSite
    grid: QuantGrid

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def module(self) -> nn.Linear:
        return self.site.module


@dataclass
class Unit:
    """The selected Linears of one UnitSite, with their grids and the folds among them."""

    site: UnitSite
    targets: list[Target]
    folds: list[FoldSite]
    exit_module: nn.Module

    @property
    def name(self) -> str:
        return self.site.name


def select(arch: Arch, recipe: Recipe, model) -> list[Unit]:
    """The units and Linears ``recipe`` quantizes, in forward order. Selectors that match nothing fail."""
    selection = recipe.selection
    available = arch.components
    for comp in selection.components:
        if comp not in available:
            raise RecipeError(
                f"component={comp!r} is invalid for {arch.family.name}: the model has no {comp}; "
                f"valid: {', '.join(available)}, or all")
    targets = selection.targets(available)
    for key in selection.include:
        heads = [u for u in arch.units if u.include == key]
        if not heads:
            raise RecipeError(f"include={key!r} is invalid for {arch.family.name}: the model has no {key}; valid: none")
        if not any(u.component in targets for u in heads):
            raise RecipeError(f"include={key!r} is invalid: its component ({heads[0].component}) is not quantized "
                              f"by this recipe; valid: add {heads[0].component} to component")
    all_groups = selection.layer_groups == LAYER_GROUPS
    all_types = selection.layer_types == LAYER_TYPES
    modules = dict(model.named_modules())
    units: list[Unit] = []
    count = {c: 0 for c in targets}
    for site in arch.units:
        if site.component not in targets:
            continue
        if site.include is not None:
            if site.include not in selection.include:
                continue
            chosen = site.linears  # an explicitly requested head ignores depth/type selectors
        else:
            if site.block is not None:
                if third_of(site.block, site.n_blocks) not in selection.layer_groups:
                    continue
            elif not all_groups:
                continue
            chosen = [s for s in site.linears if all_types or s.kind in selection.layer_types]
        if not chosen:
            continue
        grid = recipe.grid.for_bits(selection.bits_for(site.component))
        names = {s.name for s in chosen}
        folds = [f for f in site.folds if all(lin in names for lin in f.linears)]
        exit_path = ".".join(os.path.commonprefix([s.name.split(".") for s in chosen]))
        units.append(Unit(site, [Target(s, grid) for s in chosen], folds, modules[exit_path]))
        count[site.component] += len(chosen)
    for comp in selection.components:
        if count.get(comp, 0) == 0:
            raise RecipeError(
                f"component={comp!r} with {selection.describe_layers()} selects no weight in {arch.family.name} "
                f"(its projector/non-block Linears are selected only by layer_group=all and layer_type=all, "
                f"and a stack of n blocks has n//3 front blocks); valid: a layer_group/layer_type that "
                f"exists in that component")
    if not units:
        raise RecipeError(f"{selection.describe_layers()} selects no weight in components {'+'.join(targets)} of "
                          f"{arch.family.name}; valid: a selection that matches at least one Linear")
    return units


__all__ = [
    "ArchitectureError", "Arch", "BlockSpec", "FAMILIES", "Family", "Fold", "FoldSite", "LinearSite", "Part",
    "Target", "Unit", "UnitSite", "detect_family", "generic_family", "resolve", "select", "third_of",
]
