"""`VARGPTConfig` defaults and loading (issue: a bare config described no model that could exist)."""

from __future__ import annotations

import pytest

from vargpt.configuration import VARGPTConfig


def test_the_default_configuration_is_the_published_model():
    assert VARGPTConfig().to_dict() == VARGPTConfig.from_preset("vargpt-v1.1").to_dict()
    config = VARGPTConfig(image_resolution=256)  # one setting changed, the rest still consistent
    assert config.text_config.hidden_size == config.vision_config.hidden_size == 3584


def test_flat_settings_override_the_published_defaults():
    config = VARGPTConfig(hidden_size=64, rope_parameters={"rope_type": "default", "rope_theta": 10.0}, **_TINY_VISION)
    assert config.text_config.hidden_size == 64 and config.text_config.rope_parameters["rope_theta"] == 10.0
    assert "mrope_section" not in config.text_config.rope_parameters


def test_a_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json") as caught:
        VARGPTConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(caught.value)


_TINY_VISION = {"vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}}
