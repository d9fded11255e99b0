"""Measured training memory on the CPU against `vargpt.training.memory_plan`.

Each setting runs in a fresh process: it imports everything, builds the processor and a batch of shapes-world
generation samples, reads its resident set (VmRSS), resets the kernel's high-water mark (writing 5 to
/proc/self/clear_refs), then builds the model (random init, fp32), applies the stage's freeze and runs a
few steps of `VARGPTTrainer` (transformers' Trainer, torch AdamW, fp32). The training's peak is the
high-water mark (VmHWM) after the steps minus the resident set before the model: weights, gradients, AdamW
state, activations and whatever the Trainer and the allocator add. The child runs with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that a freed tensor goes back to the system and the high-water mark
follows the live tensors instead of heap blocks freed in an earlier phase. It is compared with the plan's total
less its runtime term (the process that was already there), planned for the batch's prompt length and the
positions its text loss reads (the only rows the LM head runs on).

    python benchmarks/train_memory.py                  # tiny and bench-100m, stage3-decoder and stage2-llm
    python benchmarks/train_memory.py --presets tiny --steps 2

Linux only (/proc). Keep bench-100m short: it is a ~100M-parameter model on a small CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_RUNS = [
    # preset, stage, resolution, batch, gradient checkpointing
    ("tiny", "stage3-decoder", 32, 4, False),
    ("tiny", "stage2-llm", 32, 4, False),
    ("bench-100m", "stage3-decoder", 64, 2, False),
    ("bench-100m", "stage3-decoder", 64, 2, True),
    ("bench-100m", "stage2-llm", 64, 2, False),
    ("bench-100m", "stage2-llm", 64, 2, True),
]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(preset: str, stage: str, resolution: int, batch: int, checkpointing: bool, steps: int) -> dict:
    """One training run in this process; returns the measured peak and the batch's shape."""
    import torch
    from transformers import TrainingArguments

    from vargpt.configuration import VARGPTConfig
    from vargpt.data.collator import SFTCollator
    from vargpt.data.formats import load_sft_dataset
    from vargpt.shapes.dataset import write_sharegpt_dataset
    from vargpt.modeling import VARGPTForConditionalGeneration
    from vargpt.pipeline import preset_processor
    from vargpt.training.memory_plan import sequence_lengths
    from vargpt.training.stages import STAGES, apply_stage
    from vargpt.training.trainer import VARGPTTrainer

    torch.manual_seed(0)
    config = VARGPTConfig.from_preset(preset)
    work = Path(tempfile.mkdtemp(prefix="train-memory-"))
    rows_file = write_sharegpt_dataset(work / "data", "train", 0, batch * steps, 0, image_size=resolution)
    dataset, _ = load_sft_dataset([str(rows_file)])
    # bench-100m keeps the tiny preset's 512-word vocabulary, which `preset_processor` does not pair it with
    tokenizer_of = (
        "tiny" if config.text_config.vocab_size == VARGPTConfig.from_preset("tiny").text_config.vocab_size else preset
    )
    processor = preset_processor(tokenizer_of)
    pads = sequence_lengths(config, resolution, prompt_tokens=1)["pads"]
    collator = SFTCollator(processor, image_gen_resolution=resolution, num_image_gen_pad_tokens=pads)
    samples = [collator([dataset[i]]) for i in range(len(dataset))]
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    # positions the text loss reads (the LM head runs on these rows only): labelled next token, not an image slot
    read = [
        int(((s["labels"][:, 1:] != -100) & (s["input_ids"][:, 1:] != config.image_gen_pad_token_id)).sum())
        for s in samples
    ]

    before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    model = VARGPTForConditionalGeneration(config)
    apply_stage(model, STAGES[stage])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    args = TrainingArguments(
        output_dir=str(work / "out"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        optim="adamw_torch",
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        logging_steps=steps,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = VARGPTTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    peak_kb = _status_kb("VmHWM")
    return {
        "peak_bytes": (peak_kb - before_kb) * 1024,
        "llm_tokens": max(lengths),
        "pads": pads,
        "answer_tokens": max(read),
    }


def plan(preset: str, stage: str, resolution: int, batch: int, checkpointing: bool, measured: dict) -> int:
    from vargpt.configuration import VARGPTConfig
    from vargpt.training.memory_plan import TrainingSetup, training_memory

    setup = TrainingSetup(
        stage=stage,
        resolution=resolution,
        batch=batch,
        gradient_checkpointing=checkpointing,
        precision="fp32",
        prompt_tokens=measured["llm_tokens"] - measured["pads"] - 2,
        answer_tokens=measured["answer_tokens"],
        device="cpu",
    )
    m = training_memory(VARGPTConfig.from_preset(preset), setup)
    return m.total - m.runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench-100m"])
    parser.add_argument("--stages", nargs="+", default=["stage3-decoder", "stage2-llm"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        preset, stage, resolution, batch, checkpointing = json.loads(args.child)
        print(json.dumps(measure(preset, stage, resolution, batch, checkpointing, args.steps)))
        return 0
    header = f"{'preset':<12}{'stage':<16}{'px':>4}{'batch':>6}{'ckpt':>6}"
    print(header + f"{'plan MB':>10}{'measured MB':>13}{'plan/meas':>11}")
    # glibc keeps freed blocks in its heap and raises its mmap threshold after each large free, so without a fixed
    # threshold the high-water mark counts freed activations of one phase on top of the next one's tensors
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    for run in DEFAULT_RUNS:
        preset, stage, resolution, batch, checkpointing = run
        if preset not in args.presets or stage not in args.stages:
            continue
        child = [sys.executable, __file__, "--steps", str(args.steps), "--child", json.dumps(run)]
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        planned = plan(*run, measured)
        print(
            f"{preset:<12}{stage:<16}{resolution:>4}{batch:>6}{'on' if checkpointing else 'off':>6}"
            f"{planned / 1e6:>10.1f}{measured['peak_bytes'] / 1e6:>13.1f}{planned / measured['peak_bytes']:>11.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
