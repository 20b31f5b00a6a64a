"""Block tables shared by several families: CLIP/SigLIP vision blocks and decoder-only LM blocks."""

from __future__ import annotations

from ..spec import BlockSpec, Fold

# CLIP, SigLIP (LLaVA-OneVision, Gemma 3, PaliGemma) and the Idefics3 / SmolVLM vision encoder share
# these names: pre-LN blocks, separate q/k/v, (quick-)GELU MLP.
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


def _gemma_attention_folds(input_norm: str) -> tuple[Fold, ...]:
    return (
        # Gemma's RMSNorm scales by (1 + w): the fold rewrites w so that (1 + w') = (1 + w) / s.
        Fold(input_norm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), weight_offset=1.0),
        # Exact without grouped-query attention; with it the widths differ and the fold is dropped.
        Fold("self_attn.v_proj", ("self_attn.o_proj",)),
    )


# Gemma (PaliGemma 1): Llama's names, (1 + w) RMSNorms, GELU-gated MLP (gelu(gate x) * up x).
GEMMA_BLOCK = BlockSpec(
    linears=LLAMA_BLOCK.linears,
    folds=_gemma_attention_folds("input_layernorm") + (
        Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), weight_offset=1.0),
        Fold("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# Gemma 2 / Gemma 3 (PaliGemma 2, Gemma 3): "sandwich" norms. post_attention_layernorm and
# post_feedforward_layernorm normalise a block output before the residual add: they read o_proj /
# down_proj and feed no Linear, so nothing folds into them. Gemma 3's q_norm/k_norm act after
# q_proj/k_proj and do not affect the input fold.
GEMMA2_BLOCK = BlockSpec(
    linears=LLAMA_BLOCK.linears,
    folds=_gemma_attention_folds("input_layernorm") + (
        Fold("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), weight_offset=1.0),
        Fold("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# Language models whose decoder layers have Llama's module names and a plain-weight RMSNorm: the
# q/k norms of Qwen3 act after the projections, Qwen2's q/k/v biases do not change the folds.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_TEXT = {"gemma": GEMMA_BLOCK, "gemma2": GEMMA2_BLOCK, "gemma3_text": GEMMA2_BLOCK}

__all__ = ["CLIP_BLOCK", "GEMMA2_BLOCK", "GEMMA_BLOCK", "GEMMA_TEXT", "LLAMA_BLOCK", "LLAMA_LIKE"]
