"""lmms-eval model registration (entry point group ``lmms_eval.models``).

lmms-eval imports this module while ``lmms_eval.models`` is still initialising, so it must import
neither torch nor ``lmms_eval.models`` itself: only the manifest dataclass, and class paths as strings.
"""

from lmms_eval.models.registry_v2 import ModelManifest

from lmms_quant.model_ids import MODEL_CLASSES


def manifests():
    return [ModelManifest(model_id=model_id, chat_class_path=path) for model_id, path in MODEL_CLASSES.items()]
