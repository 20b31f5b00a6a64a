"""The quantization engine: plan, architecture tables, RTN/GPTQ/AWQ, calibration, report.

    plan = QuantPlan.from_kwargs({"method": "gptq", "bits": 4, "component": "vit"})
    report = quantize_model(model, processor, plan)
    report.write_json("quant_report.json")
"""

from .api import QuantizationError, quantize_model
from .archs import ArchitectureError
from .plan import PLAN_KEYS, PlanError, QuantPlan
from .report import QuantReport

__all__ = ["ArchitectureError", "PLAN_KEYS", "PlanError", "QuantPlan", "QuantReport", "QuantizationError",
           "quantize_model"]
