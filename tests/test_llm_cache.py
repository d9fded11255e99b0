import inspect
import warnings

import torch
from transformers.cache_utils import Cache
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from vargpt import VARGPTPipeline
from vargpt.llm_cache import CACHE_ARGUMENT, returned_cache

from .test_modeling import make_tiny_model


def test_the_cache_argument_is_one_the_installed_llm_takes_and_returns_a_cache():
    assert CACHE_ARGUMENT in inspect.signature(Qwen2VLTextModel.forward).parameters
    model = make_tiny_model().eval()
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert isinstance(returned_cache(out), Cache)
    assert returned_cache(out).get_seq_length() == 3


def test_text_and_image_generation_use_no_deprecated_cache_names():
    """transformers 5.25 warns at every LLM call that still says `past_key_values`; none of ours may."""
    pipe = VARGPTPipeline.from_pretrained("tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.chat("Is there a red circle?", max_new_tokens=4)
        pipe.generate("a red circle", seed=0)
    deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not deprecated, deprecated[:2]
