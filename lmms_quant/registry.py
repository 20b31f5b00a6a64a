"""lmms-eval model registration (entry point group ``lmms_eval.models``).

lmms-eval imports this module while ``lmms_eval.models`` is still initialising, so it must import
neither torch nor ``lmms_eval.models`` itself: only the manifest dataclass, and class paths as strings.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_CLASSES = {
    "quant_blip2": "lmms_quant.model_wrappers.blip2.QuantBlip2",
    "quant_llava": "lmms_quant.model_wrappers.llava.QuantLlava",
    "quant_blip2_itm": "lmms_quant.model_wrappers.blip2_itm.QuantBlip2ITM",
}


def manifests():
    return [ModelManifest(model_id=model_id, chat_class_path=path) for model_id, path in MODEL_CLASSES.items()]
