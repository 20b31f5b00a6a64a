"""scripts/train_tiny_vlm.py, run with its default recipe and the committed tokenizers, builds exactly the
configs and processors of the checkpoints shipped in lmms_quant/assets.

The shipped models cannot be retrained in a test, so this pins what a re-run would start from: the
model, generation and processor configs the script's own builders produce (untrained models, no data).
"""

from pathlib import Path

import pytest
from transformers import AutoConfig, AutoProcessor, GenerationConfig

import lmms_quant
from lmms_quant.scripts import train_tiny_vlm

ASSETS = Path(lmms_quant.__file__).parent / "assets"
# Written by save_pretrained, not by the config the script builds: the library version, the load path,
# and the class and dtype of the saved weights (checked against the built model instead).
METADATA = {"transformers_version", "_name_or_path", "architectures", "dtype"}


def without_metadata(value):
    if isinstance(value, dict):
        return {k: without_metadata(v) for k, v in value.items() if k not in METADATA}
    return value


@pytest.fixture(scope="module")
def built():
    """{asset dir: (model, processor)} as the script's main() builds them before training."""
    recipe = train_tiny_vlm.Recipe()
    tokenizers = train_tiny_vlm.load_or_train_tokenizers(ASSETS, recipe)
    blip2 = train_tiny_vlm.build_blip2(recipe, tokenizers["bpe_blip2"])
    llava = train_tiny_vlm.build_llava(recipe, tokenizers["bpe_llava"])
    itm_model, itm_processor, _ = train_tiny_vlm.build_itm(recipe, blip2.model, tokenizers["wordpiece"],
                                                           tokenizers["bpe_blip2"])
    return {
        train_tiny_vlm.ASSET_DIRS["blip2"]: (blip2.model, blip2.processor),
        train_tiny_vlm.ASSET_DIRS["llava"]: (llava.model, llava.processor),
        train_tiny_vlm.ASSET_DIRS["itm"]: (itm_model, itm_processor),
    }


@pytest.mark.parametrize("name", ["tiny_blip2", "tiny_blip2_itm", "tiny_llava"])
def test_default_recipe_builds_the_shipped_model_config(built, name):
    model, _ = built[name]
    shipped = AutoConfig.from_pretrained(ASSETS / name, local_files_only=True)
    assert type(model.config) is type(shipped)
    assert without_metadata(model.config.to_dict()) == without_metadata(shipped.to_dict())
    assert shipped.architectures == [type(model).__name__]
    assert shipped.dtype == model.dtype


@pytest.mark.parametrize("name", ["tiny_blip2", "tiny_llava"])
def test_default_recipe_builds_the_shipped_generation_config(built, name):
    model, _ = built[name]
    shipped = GenerationConfig.from_pretrained(ASSETS / name, local_files_only=True)
    assert without_metadata(model.generation_config.to_dict()) == without_metadata(shipped.to_dict())


@pytest.mark.parametrize("name", ["tiny_blip2", "tiny_blip2_itm", "tiny_llava"])
def test_default_recipe_builds_the_shipped_processor_config(built, name):
    _, processor = built[name]
    shipped = AutoProcessor.from_pretrained(ASSETS / name, local_files_only=True)
    assert type(processor) is type(shipped)
    assert processor.to_dict() == shipped.to_dict()
    assert type(processor.image_processor) is type(shipped.image_processor)
    assert processor.chat_template == shipped.chat_template
