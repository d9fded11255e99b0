"""`vargpt finetune`: many processes agree with one, and a SIGKILLed run resumes to the same end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vargpt.shapes.dataset import write_sharegpt_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def generation_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    path = write_sharegpt_dataset(root, "train", 0, 24, 0, seed=3)
    return path


def finetune_command(
    data: Path, out: Path, batch: int, steps: int = 6, save_steps: int = 50, noise: bool = False
) -> list[str]:
    """`noise=False` turns off bit flips and condition dropout, whose random draws depend on how samples
    are split over processes."""
    return [
        "-m", "vargpt.cli", "finetune", "--model", "tiny", "--data", str(data), "--out", str(out),
        "--stage", "stage3-decoder", "--steps", str(steps), "--batch-size", str(batch),
        "--learning-rate", "0.003", "--save-steps", str(save_steps), "--seed", "0", "--cpu",
    ] + ([] if noise else ["--no-image-noise"])  # fmt: skip


def losses(out: Path) -> list[float]:
    history = json.loads((out / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def test_two_processes_follow_one_process_with_the_same_global_batch(generation_data, tmp_path):
    single = tmp_path / "single"
    subprocess.run([sys.executable, *finetune_command(generation_data, single, batch=4)], check=True, env=ENV)
    double = tmp_path / "double"
    # the shipped config starts two torch.distributed processes; --cpu keeps them on the CPU (gloo) also on a
    # machine with a GPU, where both would otherwise take the one GPU and NCCL refuses
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    subprocess.run([*launch, *finetune_command(generation_data, double, batch=2)], check=True, env=ENV)
    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 6
    # same samples per global step; gloo all-reduce of fp32 gradients differs only by summation order
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-3 * max(one)
    assert one[-1] < one[0]


def test_sigkilled_run_resumes_and_ends_where_an_uninterrupted_run_ends(generation_data, tmp_path):
    reference = tmp_path / "reference"
    # random bit flips stay on: the resumed run must restore the random state as well as the data order
    cmd = finetune_command(generation_data, reference, batch=4, steps=8, save_steps=2, noise=True)
    subprocess.run([sys.executable, *cmd], check=True, env=ENV)

    killed = tmp_path / "killed"
    cmd = finetune_command(generation_data, killed, batch=4, steps=8, save_steps=2, noise=True)
    proc = subprocess.Popen([sys.executable, *cmd], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-4" / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    subprocess.run([sys.executable, *cmd], check=True, env=ENV)
    resumed, uninterrupted = losses(killed), losses(reference)
    assert resumed[-4:] == pytest.approx(uninterrupted[-4:], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(killed / "final" / "model.safetensors"))
    b = load_file(str(reference / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_lora_finetune_saves_the_adapter_and_a_merged_model_in_the_original_layout(
    tiny_checkpoint, generation_data, tmp_path
):
    from safetensors.torch import load_file

    from vargpt.modeling import VARGPTForConditionalGeneration
    from vargpt.training.finetune import FinetuneArgs, run_finetune

    out = tmp_path / "lora"
    args = FinetuneArgs(
        model=str(tiny_checkpoint), data=[str(generation_data)], out=str(out), steps=3, batch_size=2,
        learning_rate=0.05, cpu=True, quiet=True, lora=True, lora_rank=4, lora_parts="decoder", no_image_noise=True,
    )  # fmt: skip
    result = run_finetune(args)
    assert (out / "adapter" / "adapter_config.json").is_file()
    report = VARGPTForConditionalGeneration.check_checkpoint(out / "final")
    assert report.ok, report.describe()
    before, after = (
        load_file(str(tiny_checkpoint / "model.safetensors")),
        load_file(str(out / "final/model.safetensors")),
    )
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # the merged update lands in the decoder blocks' linear weights only, and the adapter is a small share
    assert changed and all(name.startswith("vargpt_gen.block_chunks.") for name in changed)
    assert 0 < result["trainable"] < 0.2 * sum(t.numel() for t in before.values())


def test_contradictory_or_unsupported_plans_are_refused_before_loading(monkeypatch, generation_data, tmp_path):
    from vargpt.training.finetune import FinetuneArgs, run_finetune

    common = {"model": "tiny", "data": [str(generation_data)], "out": str(tmp_path / "x"), "cpu": True}
    with pytest.raises(ValueError, match="--quantize trains adapters"):
        run_finetune(FinetuneArgs(**common, quantize="int4"))
    with pytest.raises(ValueError, match="drop --trainable"):
        run_finetune(FinetuneArgs(**common, lora=True, trainable=["vargpt_gen."]))
    if not torch.cuda.is_available():
        # accelerate would silently train these CPU processes as DDP replicas
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(ValueError, match="FSDP and DeepSpeed need GPUs"):
            run_finetune(FinetuneArgs(**common))
