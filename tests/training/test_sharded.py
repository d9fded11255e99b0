"""Sharded training on two CPU processes (gloo): FSDP2 and DeepSpeed ZeRO-3 follow one process's losses, and
loading never puts the whole model in more than one process."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vargpt.shapes.dataset import write_sharegpt_dataset

WORKER = Path(__file__).with_name("sharded_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def generation_rows(tmp_path_factory) -> Path:
    return write_sharegpt_dataset(tmp_path_factory.mktemp("data"), "train", 0, 16, 0, seed=5)


def run_worker(processes: int, mode: str, checkpoint: Path, data: Path) -> list[dict]:
    report = Path(tempfile.mkdtemp(prefix=f"{mode}-{processes}-"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        str(WORKER), "--mode", mode, "--checkpoint", str(checkpoint), "--data", str(data), "--report", str(report),
    ]  # fmt: skip
    # its own session, so a hang takes torchrun's worker processes down with it, not only torchrun
    proc = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{mode} with {processes} processes did not finish in 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in report.glob("rank*.json")]
    assert sorted(r["rank"] for r in reports) == list(range(processes))
    return sorted(reports, key=lambda r: r["rank"])


def full_bytes(checkpoint: Path) -> int:
    """Parameter bytes of the whole model in fp32 (the checkpoint's buffers are a rounding error here)."""
    from safetensors.torch import load_file

    return sum(t.numel() * 4 for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_fsdp_two_processes_follow_one_and_only_rank0_reads_the_weights(tiny_checkpoint, generation_rows):
    one = run_worker(1, "fsdp", tiny_checkpoint, generation_rows)
    two = run_worker(2, "fsdp", tiny_checkpoint, generation_rows)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    assert one[0]["losses"][-1] < one[0]["losses"][0]
    # rank 0 reads the checkpoint; rank 1 builds on the meta device and receives its shards
    assert two[0]["parameter_bytes_after_loading"] == pytest.approx(full_bytes(tiny_checkpoint), rel=0.01)
    assert two[1]["parameter_bytes_after_loading"] == 0


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero3_two_processes_follow_one_and_each_holds_half(tiny_checkpoint, generation_rows):
    one = run_worker(1, "zero3", tiny_checkpoint, generation_rows)
    two = run_worker(2, "zero3", tiny_checkpoint, generation_rows)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    assert one[0]["losses"][-1] < one[0]["losses"][0]
    whole = one[0]["parameter_bytes_after_loading"]
    for rank in two:  # partitioned as it loaded: each process holds its half (plus alignment padding)
        assert 0.45 * whole < rank["parameter_bytes_after_loading"] < 0.55 * whole
