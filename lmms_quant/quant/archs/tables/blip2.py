"""BLIP-2 (OPT, Flan-T5, retrieval) and InstructBLIP (Vicuna/Llama, Flan-T5).

InstructBLIP has BLIP-2's layout; its Q-Former also reads the instruction, so the Q-Former's text
feed-forward (``intermediate.dense`` / ``output.dense``), optional in BLIP-2, is used there.
"""

from __future__ import annotations

from ..spec import BlockSpec, Family, Fold, Part
from .blocks import LLAMA_BLOCK

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
    outside=("vision_projection", "text_projection", "itm_head"),
)

INSTRUCTBLIP = Family(
    name="instructblip",
    roots=BLIP2_OPT.roots,
    parts=_BLIP2_VISION_AND_QFORMER + (
        Part("connector", linears={"language_projection": "proj.language"}),
        Part("llm", stack="language_model.model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
             config="text_config"),
        Part("llm", linears={"language_model.lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
    ),
    # The processor gives the Q-Former and the LM the same instruction text.
    prompt_style="blip2_causal",
)

INSTRUCTBLIP_T5 = Family(
    name="instructblip_t5",
    roots=BLIP2_OPT.roots,
    parts=BLIP2_T5.parts,
    prompt_style="blip2_seq2seq",
)

__all__ = ["BLIP2_ITM", "BLIP2_OPT", "BLIP2_T5", "BLIP2_VIT_BLOCK", "INSTRUCTBLIP", "INSTRUCTBLIP_T5", "OPT_BLOCK",
           "QFORMER_BLOCK", "T5_DECODER_BLOCK", "T5_ENCODER_BLOCK"]
