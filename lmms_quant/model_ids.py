"""lmms-eval model id → class path of its wrapper. Import-free, so anything may read it at any time
(the registry module itself is imported by lmms-eval while ``lmms_eval.models`` initialises, and
importing it first from elsewhere would start that initialisation half-way through)."""

MODEL_CLASSES = {
    "quant_blip2": "lmms_quant.model_wrappers.blip2.QuantBlip2",
    "quant_llava": "lmms_quant.model_wrappers.llava.QuantLlava",
    "quant_hf": "lmms_quant.model_wrappers.hf.QuantHF",
    "quant": "lmms_quant.model_wrappers.lmms_eval_model.QuantLmmsEval",
    "quant_blip2_itm": "lmms_quant.model_wrappers.blip2_itm.QuantBlip2ITM",
}


def model_class(model_id: str):
    """The wrapper class of an lmms-quant model id (imports it: torch, transformers, lmms-eval)."""
    import importlib

    module, _, name = MODEL_CLASSES[model_id].rpartition(".")
    return getattr(importlib.import_module(module), name)
