"""The shipped accelerate configurations parse as accelerate configs of the intended kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("fsdp.yaml", DistributedType.FSDP),
        ("deepspeed-zero3.yaml", DistributedType.DEEPSPEED),
        ("deepspeed-zero2.yaml", DistributedType.DEEPSPEED),
        ("cpu-2proc.yaml", DistributedType.MULTI_GPU),
    ],
)
def test_config_loads(name, kind):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == kind
    if kind == DistributedType.FSDP:
        wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "DecoderBlock"} == set(wrapped)
    if name == "deepspeed-zero3.yaml":
        assert config.deepspeed_config["zero_stage"] == 3
