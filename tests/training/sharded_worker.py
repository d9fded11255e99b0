"""A few SFT steps of a checkpoint under FSDP2 or DeepSpeed ZeRO-3, run by `torchrun` from test_sharded.py.

Neither runs through `vargpt finetune` on a CPU-only machine (accelerate enables FSDP and DeepSpeed only on
accelerators and runs CPU processes as DDP), so this worker drives the same pieces by hand: the distributed
state exists before the model loads (as `run_finetune` builds `TrainingArguments` first), the checkpoint loads
through `run_finetune`'s own `load_for_training`, and the model trains sharded. It writes one JSON report
per rank into a file: the losses (averaged over ranks) and the parameter bytes this rank held right after loading.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from vargpt.data.collator import SFTCollator
from vargpt.data.formats import load_sft_dataset
from vargpt.training.finetune import load_for_training, materialised_bytes
from vargpt.training.stages import STAGES, apply_stage

GLOBAL_BATCH = 4
LEARNING_RATE = 3e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("fsdp", "zero3"), required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--report", required=True, help="folder for one rank<N>.json per process")
    args = parser.parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    per_rank = GLOBAL_BATCH // world
    keep_alive = None
    if args.mode == "zero3":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = {
            "train_micro_batch_size_per_gpu": per_rank,
            "train_batch_size": GLOBAL_BATCH,
            "zero_optimization": {"stage": 3},
            # torch's AdamW: DeepSpeed's fused CPU Adam needs a compiled extension
            "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "weight_decay": 0.0, "torch_adam": True}},
        }
        keep_alive = HfDeepSpeedConfig(ds_config)  # what TrainingArguments sets up: from_pretrained partitions
    else:
        dist.init_process_group("gloo")
        # accelerate's environment for FSDP with CPU-RAM-efficient loading: only local rank 0 reads the weights
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    model, processor = load_for_training(args.checkpoint, torch.float32, seed=0)
    loaded_bytes = materialised_bytes(model)
    model.config.bit_flip_max_prob = 0.0
    model.config.visual_decoder_config.cond_drop_rate = 0.0
    apply_stage(model, STAGES["stage3-decoder"])
    if args.mode == "zero3":
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        model, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=keep_alive.config)
        step = model.step

        def backward(loss):
            model.backward(loss)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        full_state = model.state_dict() if rank == 0 else {}
        wrapped = set(model._no_split_modules)
        for module in list(model.modules()):
            if type(module).__name__ in wrapped:
                fully_shard(module)
        fully_shard(model)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0
        )

        def step():
            optimizer.step()
            optimizer.zero_grad()

        def backward(loss):
            loss.backward()

    dataset, _ = load_sft_dataset([args.data])
    config = model.module.config if hasattr(model, "module") else model.config
    resolution = config.image_resolution
    base = model.module if hasattr(model, "module") else model
    collator = SFTCollator(
        processor,
        image_gen_resolution=resolution,
        num_image_gen_pad_tokens=base.num_image_gen_pad_tokens(base.generation_schedule(resolution)),
        max_length=config.text_config.max_position_embeddings,
    )
    model.train()
    losses = []
    for index in range(args.steps):
        first = index * GLOBAL_BATCH + rank * per_rank
        outputs = model(**collator([dataset[i] for i in range(first, first + per_rank)]))
        backward(outputs.loss)
        step()
        loss = outputs.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
    report = {"rank": rank, "losses": losses, "parameter_bytes_after_loading": loaded_bytes}
    (Path(args.report) / f"rank{rank}.json").write_text(json.dumps(report))  # a file each: stdout lines interleave
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
