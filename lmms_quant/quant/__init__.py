"""The quantization engine: recipe, architecture tables, RTN/GPTQ/AWQ, calibration, report.

    recipe = Recipe.parse({"method": "gptq", "bits": 4, "component": "vit"})
    report = quantize(model, processor, recipe)
    report.write_json("quant_report.json")

Names are imported lazily, so that `lmms_quant.quant.recipe` (stdlib only until a method is looked
up) can be used without importing the engine.
"""

_LAZY = {
    "quantize": "api", "run_quantization": "api", "QuantizationError": "api",
    "ArchitectureError": "archs",
    "Recipe": "recipe", "recipe_keys": "recipe",
    "RecipeError": "method",
    "QuantReport": "report",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
