"""``quant``: one of lmms-eval's OWN model classes, quantized.

    lmms-eval --model quant \\
      --model_args model=qwen2_5_vl,pretrained=Qwen/Qwen2.5-VL-3B-Instruct,method=gptq,bits=4,component=vit ...

``model`` names an lmms-eval model id (``llava_hf``, ``qwen2_5_vl``, ``instructblip``, ...). The
other ``model_args`` keys are split three ways before anything is loaded: lmms-quant's recipe keys and
its own keys (``report_dir``, ``weight_cache``) stay here; the rest must be parameters of that
model class's ``__init__`` and go to it (several lmms-eval classes assert that they get nothing
else); a key that is neither is an error naming it. The class is resolved and built through
lmms-eval's own registry, so prompts, batching and generation are exactly lmms-eval's.

Inside the built object we find the one transformers ``PreTrainedModel`` and the one
``ProcessorMixin`` (whatever the attributes are called: ``_model``/``model``,
``processor``/``_image_processor``). Before the first request, the model is quantized in place
through the same seam as every lmms-quant wrapper (``common.quantize_for_requests``), calibrating
with that processor; then every request goes to lmms-eval's object unchanged. lmms-eval decides the
request format from ``lm.is_simple`` after construction, so this wrapper takes the wrapped class'
value (``instructblip`` is a simple model, ``qwen2_5_vl`` a chat one).
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

from loguru import logger as eval_logger
from lmms_eval.api.model import lmms

import lmms_quant
from lmms_quant.values import format_value, parse_model_args, text

from .common import quantize_for_requests, report_path
from .loading import parse_wrapper_args

# Keys of this wrapper; every other key is a recipe key or the wrapped class' own parameter.
OWN_KEYS = ("model", "report_dir", "weight_cache", "lmms_quant_version")
# What lmms-eval's evaluator itself passes (create_from_arg_string's additional_config): handed on
# when the wrapped class takes it, else dropped, as that class was never asked for it by the user.
EVALUATOR_KEYS = ("batch_size", "max_batch_size", "device")


def parse_recipe(kwargs: dict):
    """The quantization recipe of ``kwargs`` (recipe keys only), validated."""
    from lmms_quant.quant.recipe import Recipe

    return Recipe.parse(kwargs)


def recipe_keys() -> tuple[str, ...]:
    from lmms_quant.quant.recipe import recipe_keys as keys

    return tuple(keys())


def lmms_eval_class(model_id) -> type:
    """The lmms-eval model class of ``model_id``, through lmms-eval's registry (chat class preferred, as lmms-eval does)."""
    from lmms_eval.models import get_model, list_available_models

    from lmms_quant.model_ids import MODEL_CLASSES

    model_id = text(model_id)
    if model_id is None:
        raise ValueError("model: missing; valid: an lmms-eval model id such as llava_hf, qwen2_5_vl, instructblip")
    if model_id in MODEL_CLASSES or model_id == "quant":
        raise ValueError(f"model: got {model_id!r}, an lmms-quant model; valid: one of lmms-eval's own model ids "
                         f"(use --model {model_id} directly)")
    known = list_available_models(include_aliases=True)
    if model_id not in known:
        raise ValueError(f"model: got {model_id!r}; valid: an lmms-eval model id: {', '.join(sorted(known))}")
    try:
        return get_model(model_id)
    except ImportError as err:
        raise ValueError(f"model: lmms-eval's {model_id!r} cannot be imported here ({err}); valid: install what it "
                         f"needs (pip install 'lmms-quant[lmms-eval-models]' covers llava_hf, qwen2_5_vl, "
                         f"instructblip)") from err


def init_parameters(cls) -> dict[str, inspect.Parameter]:
    """The named keyword parameters of ``cls.__init__`` (inherited ones included)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind in kinds}


def split_model_args(kwargs: dict, cls: type, model_id: str) -> tuple[dict, dict, dict]:
    """(our own keys, recipe keys, the wrapped class' kwargs); an unknown or ambiguous key is a ValueError naming it."""
    accepted = init_parameters(cls)
    recipe = recipe_keys()
    own, recipe_kwargs, inner = {}, {}, {}
    for key, value in kwargs.items():
        if key in OWN_KEYS:
            own[key] = value
        elif key in recipe:
            if key in accepted:
                raise ValueError(f"{key}: got {value!r}, but {key!r} is both an lmms-quant quantization key and a "
                                 f"parameter of lmms-eval's {model_id} ({cls.__name__}); valid: not both")
            recipe_kwargs[key] = value
        elif key in accepted:
            inner[key] = value
        elif key in EVALUATOR_KEYS:
            eval_logger.debug(f"lmms-quant: {cls.__name__} takes no {key!r}; {key}={value!r} is not passed on")
        else:
            close = difflib.get_close_matches(str(key), (*recipe, *OWN_KEYS, *accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r} (value {value!r}){hint}; valid: lmms-quant's quantization keys "
                             f"{', '.join(recipe)}; lmms-quant's {', '.join(OWN_KEYS)}; and lmms-eval's {model_id} "
                             f"({cls.__name__}) parameters {', '.join(sorted(accepted)) or '(none)'}")
    return own, recipe_kwargs, inner


def find_hf_parts(lm) -> tuple:
    """(the transformers PreTrainedModel, the ProcessorMixin) inside an lmms-eval model object.

    Looked up by type, not by name: lmms-eval's classes call them ``_model``/``model``,
    ``processor``/``_image_processor``. A ``model`` property that unwraps an accelerate wrapper wins.
    """
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

    attributes = dict(vars(lm))
    for name in ("model", "processor"):
        try:
            attributes.setdefault(name, getattr(lm, name))
        except Exception:  # a property that fails (no such part): nothing to find there
            pass
    models, processors = {}, {}
    for name, value in attributes.items():
        if isinstance(value, PreTrainedModel):
            models.setdefault(id(value), (name, value))
        elif isinstance(value, ProcessorMixin):
            processors.setdefault(id(value), (name, value))
    found = ", ".join(f"{n}: {type(v).__name__}" for n, v in attributes.items()
                      if isinstance(v, (torch.nn.Module, ProcessorMixin)) or "processor" in n or "tokenizer" in n)
    where = f"lmms-eval's {type(lm).__name__} object"
    if len(models) != 1:
        raise ValueError(f"model: {where} holds {len(models)} transformers PreTrainedModel(s) "
                         f"({', '.join(n for n, _ in models.values()) or 'none'}); lmms-quant needs exactly one. "
                         f"Found: {found or 'no module or processor attributes'}")
    if len(processors) != 1:
        raise ValueError(f"model: {where} holds {len(processors)} transformers processor(s) (ProcessorMixin: "
                         f"{', '.join(n for n, _ in processors.values()) or 'none'}); lmms-quant calibrates with "
                         f"exactly one. Found: {found or 'no module or processor attributes'}")
    return next(iter(models.values()))[1], next(iter(processors.values()))[1]


class QuantLmmsEval(lmms):
    """lmms-eval's own model class ``model=...``, quantized lazily before its first request."""

    # The registry slot is the chat one; each instance then takes the wrapped class' value.
    is_simple = False

    @classmethod
    def validate_model_args(cls, kwargs: dict):
        """(wrapped class, model id, WrapperArgs, recipe, the wrapped class' kwargs); nothing is loaded."""
        inner_cls = lmms_eval_class(kwargs.get("model"))
        model_id = text(kwargs["model"])
        own, recipe_kwargs, inner = split_model_args(kwargs, inner_cls, model_id)
        recipe = parse_recipe(recipe_kwargs)
        default = init_parameters(inner_cls).get("pretrained")
        pretrained = inner.get("pretrained", None if default is None else default.default)
        if pretrained is None or pretrained is inspect.Parameter.empty:
            pretrained = model_id  # the name lmms-eval then gives the results directory (model=...)
        args = parse_wrapper_args({"pretrained": pretrained, **{k: v for k, v in own.items() if k != "model"}})
        return inner_cls, model_id, args, recipe, inner

    @classmethod
    def canonical_model_args(cls, model_args: str) -> str:
        """The --model_args string with the resolved recipe and the lmms-quant version spelt out (``lmms-quant eval``)."""
        kwargs = parse_model_args(model_args or "")
        if "batch_size" in kwargs:
            raise ValueError(f"batch_size: got {kwargs['batch_size']!r} inside --model_args; valid: pass it as "
                             f"lmms-eval's --batch_size (lmms-eval always passes its own)")
        _, model_id, _, recipe, inner = cls.validate_model_args(kwargs)
        own = {k: v for k, v in kwargs.items() if k in OWN_KEYS and k != "model"}
        own["lmms_quant_version"] = lmms_quant.__version__
        ordered = {"model": model_id, **inner, **own, **recipe.to_model_args()}
        canonical = ",".join(f"{k}={format_value(v)}" for k, v in ordered.items())
        if list(parse_model_args(canonical)) != list(ordered):
            raise ValueError(f"model_args: cannot spell {ordered!r} as one lmms-eval model_args string "
                             f"(a value holds a comma or '=')")
        return canonical

    def __init__(self, **model_args) -> None:
        super().__init__()
        inner_cls, self.model_id, self.args, self.recipe, inner_kwargs = self.validate_model_args(model_args)
        eval_logger.info(f"lmms-quant: building lmms-eval's {self.model_id} ({inner_cls.__name__}) with {inner_kwargs}")
        self.lm = inner_cls(**inner_kwargs)
        self.is_simple = self.lm.is_simple
        self.hf_model, self.processor = find_hf_parts(self.lm)
        self.quant_report = None
        self._quantization_pending = not self.recipe.is_noop

    # ------------------------------------------------------------------ what lmms-eval reads and sets

    @property
    def task_dict(self) -> dict:
        # lmms-eval fills lm.task_dict[task] = dataset; the wrapped object looks docs up in its own.
        return self.lm.task_dict if "lm" in vars(self) else vars(self).setdefault("_task_dict", {})

    @task_dict.setter
    def task_dict(self, value: dict) -> None:
        if "lm" in vars(self):
            self.lm.task_dict = value
        else:  # lmms.__init__, before the wrapped object exists
            vars(self)["_task_dict"] = value

    @property
    def rank(self):
        return self.lm.rank

    @property
    def world_size(self):
        return self.lm.world_size

    def set_cache_hook(self, cache_hook) -> None:
        self.lm.set_cache_hook(cache_hook)

    def __getattr__(self, name):
        # Anything else lmms-eval reads (device, batch_size, accelerator, chat_template, ...) is the wrapped object's.
        lm = vars(self).get("lm")
        if lm is None:
            raise AttributeError(name)
        return getattr(lm, name)

    def clean(self):
        self.hf_model = None
        self.lm.clean()

    # ------------------------------------------------------------------ quantization and requests

    def report_path(self) -> Path | None:
        """<output_path>/<model_name_sanitized>/quant_report_<recipe digest>.json, beside lmms-eval's results."""
        return report_path(self.args.report_dir, self.args.pretrained, self.recipe.digest())

    def ensure_quantized(self, requests) -> None:
        """Quantize the wrapped model once, before its first request, knowing which datasets are scored."""
        if not self._quantization_pending:
            return
        # device=None: the model stays where lmms-eval's class put it
        self.quant_report = quantize_for_requests(self.hf_model, self.processor, self.recipe, self.args, requests,
                                                  self.task_dict, device=None)
        self._quantization_pending = False

    def generate_until(self, requests):
        self.ensure_quantized(requests)
        return self.lm.generate_until(requests)

    def loglikelihood(self, requests):
        self.ensure_quantized(requests)
        return self.lm.loglikelihood(requests)

    def generate_until_multi_round(self, requests):
        self.ensure_quantized(requests)
        return self.lm.generate_until_multi_round(requests)
