"""The vocabulary of architecture tables: folds, block specs, parts, families (data only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class ArchitectureError(RuntimeError):
    """A model does not match its architecture table (e.g. a transformers version renamed modules)."""


@dataclass(frozen=True)
class Fold:
    """AWQ may scale the input columns of ``linears`` by s and divide ``prev`` by s: exact because
    ``prev``'s output reaches the linears only through ops that commute with a positive per-channel
    scale. ``prev`` is a LayerNorm/RMSNorm (weight and bias divided) or a Linear (output rows and bias
    divided; ``prev_rows=(i, n)`` restricts that to the i-th of n equal row chunks, e.g. the v part of a
    fused qkv). ``when`` names a config predicate in CONDITIONS that must hold.

    ``weight_offset``: the norm multiplies by ``weight_offset + weight`` (Gemma's RMSNorm computes
    x_hat * (1 + w)). Dividing ``w`` by s would then be wrong; the fold sets w' = (offset + w) / s - offset,
    so that (offset + w') = (offset + w) / s exactly."""

    prev: str
    linears: tuple[str, ...]
    prev_rows: tuple[int, int] | None = None
    when: str | None = None
    # A bias of those rows kept outside ``prev`` (older BLIP-2 code adds a separate v_bias); divided too.
    prev_bias: str | None = None
    weight_offset: float = 0.0


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
class MatmulWeight:
    """A weight the model applies as ``torch.matmul(x, weight)`` instead of through an nn.Linear
    (Gemma 3's ``mm_input_projection_weight``, shape (in, out): the transpose of a Linear weight).

    `resolve` gives it a Linear view (`resolve.MatmulView`): an nn.Linear whose weight is the
    parameter's own storage, transposed, so every method, the calibration hooks, the report and the
    size accounting treat it as the Linear it computes, and every write lands in the parameter. The
    view is not part of the model: the model's modules and state_dict names never change.
    ``input_from``: the module whose output is x (the view is run on it while statistics are collected)."""

    role: str
    input_from: str
    transposed: bool = True  # weight is (in_features, out_features): y = x @ weight


@dataclass(frozen=True)
class Part:
    """A block stack (``stack`` + ``block``) or a set of non-block Linears (``linears``: path -> role,
    with ``folds`` among them, paths from the model root)."""

    component: str
    stack: str | None = None
    block: BlockSpec | None = None
    linears: Mapping[str, str] | None = None
    # Matmul weights (parameter path -> MatmulWeight) quantized as Linears; non-block parts only.
    matmuls: Mapping[str, MatmulWeight] | None = None
    token_mask: str | None = None  # key of the batch mask that marks real (non-padding) tokens
    include: str | None = None  # a head: quantized only when plan.include names it
    config: str | None = None  # sub-config of model.config that fold conditions read
    folds: tuple[Fold, ...] = ()


@dataclass(frozen=True)
class Family:
    """One architecture: its components (roots), parts in forward order, calibration prompt style.

    ``strict``: every Linear of the model must be covered by a part or lie under ``outside`` (task
    heads that belong to no component, e.g. the retrieval projections), else resolution fails naming
    it. ``notes``: what the engine leaves in floating point although it lies inside a component,
    said by ``lmms-quant inspect``. ``unclassified``: the
    generic fallback's Linears that it could place in no component (left in floating point)."""

    name: str
    roots: Mapping[str, tuple[str, ...]]  # component -> module/parameter paths it owns
    parts: tuple[Part, ...]  # forward order
    prompt_style: str
    strict: bool = True
    outside: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    unclassified: tuple[str, ...] = ()


def _opt_pre_ln(cfg) -> bool:
    return bool(getattr(cfg, "do_layer_norm_before", True))


def _opt_relu(cfg) -> bool:
    # relu(x / s) = relu(x) / s for s > 0; GELU has no such property.
    return getattr(cfg, "activation_function", "relu") == "relu"


def _t5_relu(cfg) -> bool:
    return getattr(cfg, "dense_act_fn", "relu") == "relu"


CONDITIONS = {"opt_pre_ln": _opt_pre_ln, "opt_relu": _opt_relu, "t5_relu": _t5_relu}

__all__ = ["ArchitectureError", "BlockSpec", "CONDITIONS", "Family", "Fold", "MatmulWeight", "Part"]
