"""lmms-quant: which part of a vision-language model can take quantization, measured with lmms-eval.

    from lmms_quant import Recipe, quantize
    recipe = Recipe.parse({"method": "gptq", "bits": 4, "component": "vit"})
    report = quantize(model, processor, recipe, evaluated=[...], cache="~/.cache/lmms_quant/weights")
"""

__version__ = "0.2.4"

_LAZY = {"quantize": "lmms_quant.quant.api", "Recipe": "lmms_quant.quant.recipe",
         "RecipeError": "lmms_quant.quant.method", "QuantReport": "lmms_quant.quant.report"}


def __getattr__(name):
    # Lazy: `import lmms_quant` stays free of torch (lmms-eval imports our registry early).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmms_quant' has no attribute {name!r}")


__all__ = ["QuantReport", "Recipe", "RecipeError", "quantize"]
