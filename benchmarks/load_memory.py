"""Peak memory of loading a checkpoint, against its size in the target dtype ("loading without a second copy").

Each measurement runs in a fresh process (under /usr/bin/time -v where it exists):
  * baseline: imports torch and vargpt and does nothing else;
  * model:    `VARGPTForConditionalGeneration.from_pretrained(dir, dtype=...)`;
  * pipeline: `VARGPTPipeline.from_pretrained(dir, dtype=..., device="cpu")` (processor and `.to(device)` too);
  * convert:  the remedy for a dtype other than the stored one: load in the stored dtype, convert shard by shard.
The child samples its own /proc/self/status every 10 ms: the peak VmRSS and, at that moment, how much of it is
anonymous memory (tensors) and how much file pages (the memory-mapped safetensors shards), and reports the
kernel's VmHWM. The goal: peak RSS <= 1.15 x (weights in the target dtype) + baseline.

A watchdog in the child ends it (exit 3) when its RSS passes `--kill-above` times the budget, so a load that
does make a second copy cannot push a shared machine into swapping or the OOM killer.

The default checkpoint is the full-size architecture with 2 LLM layers, 2 ViT blocks and 2 decoder blocks
(2.28 B values: 4.6 GB in bf16, 9.1 GB in fp32; the 152k-word embedding, text head and `sos_embedding` keep
their full size), written by `full_size_checkpoint.py` when absent.

Run:  python benchmarks/load_memory.py --json runs/load_memory.json
      python benchmarks/load_memory.py --model DIR --dtypes bfloat16       # any checkpoint directory
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MID_SIZE_OVERRIDES: dict[str, Any] = {
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "vision_config": {"depth": 2},
    "visual_decoder_config": {"depth": 2, "num_block_chunks": 2},
}
MID_SIZE_SHARD = "1GB"  # several shards, as the published checkpoint has
GOAL_FACTOR = 1.15


# -- the child ----------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(mode: str, model_dir: str | None, dtype_name: str, kill_above: int) -> None:
    peak: dict[str, int] = {"VmRSS": 0}
    peak_anon = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            status = _status()
            if status["VmRSS"] > peak["VmRSS"]:
                peak.update(status)
            peak_anon[0] = max(peak_anon[0], status.get("RssAnon", 0))
            if kill_above and status["VmRSS"] > kill_above:
                print(json.dumps({"killed": True, "rss": status["VmRSS"], "limit": kill_above}), flush=True)
                os._exit(3)

    import torch

    import vargpt  # noqa: F401  (the baseline includes the package's imports)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    result: dict[str, Any] = {"mode": mode, "dtype": dtype_name, "after_import": _status()}
    t0 = time.perf_counter()
    if mode == "model":
        from vargpt import VARGPTForConditionalGeneration

        model = VARGPTForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    elif mode == "convert":
        model = load_then_convert(model_dir, getattr(torch, dtype_name))
    elif mode == "pipeline":
        from vargpt import VARGPTPipeline

        model = VARGPTPipeline.from_pretrained(model_dir, dtype=getattr(torch, dtype_name), device="cpu").model
    else:
        model = None
    result["load_seconds"] = time.perf_counter() - t0
    time.sleep(0.05)
    stop.set()
    thread.join()
    result["after_load"] = _status()
    result["peak_sampled"] = peak
    result["peak_anon_sampled"] = peak_anon[0]
    if model is not None:
        tensors = [*model.parameters(), *model.buffers()]
        result["weight_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
        result["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
        result["tensors"] = len(tensors)
        result["mapped"] = mapped_tensors(model)
        # weights that are views of the memory-mapped shards are read from disk only when first used: read one
        # value per page of every tensor, then look at the RSS the loaded model really occupies
        for t in tensors:
            if t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()
        result["after_touch"] = _status()
    print("RESULT " + json.dumps(result), flush=True)


def load_then_convert(model_dir: str, dtype):
    """The remedy measured by mode "convert": load in the stored dtype (transformers then makes every weight a
    zero-copy view of its memory-mapped shard), convert the tensors shard by shard in place, and copy the
    non-floating-point buffers out of the mapping. A shard's mapping goes as soon as its last tensor is
    converted, so at most one shard's pages are resident beside the converted weights."""
    import torch

    from vargpt import VARGPTForConditionalGeneration
    from vargpt.checkpoint import INDEX_FILE

    model = VARGPTForConditionalGeneration.from_pretrained(model_dir, dtype="auto")
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    index = Path(model_dir) / INDEX_FILE
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else dict.fromkeys(names, "")
    order = sorted(names, key=lambda name: (weight_map.get(name, "~"), name))  # non-persistent buffers last
    with torch.no_grad():
        for name in order:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if attr in owner._parameters:
                param = owner._parameters[attr]
                param.data = param.data.to(dtype)
            else:  # a buffer: a new tensor in the module's table, so nothing refers to the mapped one any more
                buffer = owner._buffers[attr]
                owner._buffers[attr] = buffer.to(dtype) if buffer.is_floating_point() else buffer.clone()
    return model


def mapped_tensors(model) -> dict[str, Any]:
    """Which of the model's tensors are views of a memory-mapped safetensors file (per file: count, bytes and
    the names of the non-floating-point ones), from the address ranges in /proc/self/maps. One such tensor
    keeps its whole shard mapped, and the shard's pages read while loading stay in this process's RSS."""
    ranges = []
    with open("/proc/self/maps") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi, Path(fields[-1]).name))
    files: dict[str, dict[str, Any]] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        ptr = t.data_ptr()
        for lo, hi, fname in ranges:
            if lo <= ptr < hi:
                entry = files.setdefault(fname, {"mapped_bytes": hi - lo, "tensors": 0, "bytes": 0, "non_float": []})
                entry["tensors"] += 1
                entry["bytes"] += t.numel() * t.element_size()
                if not t.is_floating_point():
                    entry["non_float"].append(name)
    return files


# -- the parent ---------------------------------------------------------------------------------------


def checkpoint_bytes(model_dir: Path, dtype_name: str) -> int:
    """Bytes of the checkpoint's tensors once loaded in `dtype_name` (integer buffers keep their width)."""
    from safetensors import safe_open

    from vargpt.checkpoint import checkpoint_files

    width = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype_name]
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
    total = 0
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                piece = handle.get_slice(name)
                count = 1
                for n in piece.get_shape():
                    count *= n
                kind = piece.get_dtype()
                total += count * (width if kind in ("BF16", "F16", "F32") else sizes[kind])
    return total


def run_child(mode: str, model_dir: Path | None, dtype_name: str, kill_above: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--dtypes", dtype_name, "--kill-bytes", str(kill_above)]
    if model_dir is not None:
        command += ["--model", str(model_dir)]
    timer = shutil.which("time")  # GNU time: its -v report has the kernel's maximum resident set size
    if timer:
        command = [timer, "-v", *command]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    out = {"mode": mode, "dtype": dtype_name, "exit_code": proc.returncode, "process_wall_s": wall}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT ") :]))
        elif line.startswith('{"killed"'):
            out["killed"] = json.loads(line)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if match:
        out["time_v_max_rss"] = int(match.group(1)) * 1024
    if proc.returncode != 0 and "killed" not in out:
        out["stderr_tail"] = proc.stderr[-3000:]
    return out


def ensure_checkpoint(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from full_size_checkpoint import write_checkpoint

    summary = write_checkpoint(model_dir, overrides=MID_SIZE_OVERRIDES, max_shard_size=MID_SIZE_SHARD)
    print(f"wrote {model_dir}: {summary['bytes'] / 1e9:.2f} GB in {summary['seconds']:.0f} s")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/vargpt-mid-synthetic", help="checkpoint directory (written if absent)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated target dtypes")
    parser.add_argument(
        "--modes",
        default="model,pipeline",
        help="what to load: model, pipeline, convert (stored dtype, then converted shard by shard: the remedy)",
    )
    parser.add_argument("--kill-above", type=float, default=1.6, help="end a child above this x its memory budget")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.dtypes, args.kill_bytes)
        return 0

    model_dir = Path(args.model)
    ensure_checkpoint(model_dir)
    baseline = run_child("baseline", None, "bfloat16", 0)
    base = baseline["after_load"]["VmHWM"]
    print(f"baseline (import torch + vargpt): peak RSS {gib(base)}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        size = checkpoint_bytes(model_dir, dtype_name)
        budget = GOAL_FACTOR * size + base
        for mode in args.modes.split(","):
            row = run_child(mode, model_dir, dtype_name, int(args.kill_above * budget))
            # the kernel's high-water mark when from_pretrained returned (the page-touching check comes after)
            peak = row.get("after_load", {}).get("VmHWM") or row.get("time_v_max_rss", 0)
            row.update(
                {
                    "checkpoint_bytes_in_dtype": size,
                    "baseline_rss": base,
                    "peak_rss": peak,
                    "peak_over_baseline": peak - base,
                    "ratio_to_checkpoint": (peak - base) / size,
                    "goal": f"peak <= {GOAL_FACTOR} x checkpoint + baseline",
                    "within_goal": peak <= budget,
                }
            )
            rows.append(row)
            sampled = row.get("peak_sampled", {})
            touched = row.get("after_touch", {})
            mapped = "; ".join(
                f"{name}: {entry['tensors']} tensors ({gib(entry['bytes'])}) of a {gib(entry['mapped_bytes'])} "
                f"mapping" + (f", non-float {entry['non_float']}" if entry["non_float"] else "")
                for name, entry in sorted(row.get("mapped", {}).items())
            )
            print(
                f"{mode:<8} {dtype_name:<8}: checkpoint {gib(size)}, peak RSS {gib(peak)} "
                f"= baseline + {row['ratio_to_checkpoint']:.2f} x checkpoint "
                f"({'within' if row['within_goal'] else 'OVER'} the {GOAL_FACTOR} x goal); at the sampled peak "
                f"anon {gib(sampled.get('RssAnon', 0))} + file {gib(sampled.get('RssFile', 0))}; after load "
                f"anon {gib(row.get('after_load', {}).get('RssAnon', 0))} + file "
                f"{gib(row.get('after_load', {}).get('RssFile', 0))}; after reading every page anon "
                f"{gib(touched.get('RssAnon', 0))} + file {gib(touched.get('RssFile', 0))}; "
                f"load {row.get('load_seconds', 0):.1f} s"
                + (f"\n    tensors still in mapped shards: {mapped}" if mapped else "")
                + (f"; KILLED above {gib(row['killed']['limit'])}" if "killed" in row else "")
                + (f"; exit {row['exit_code']}" if row["exit_code"] and "killed" not in row else "")
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"baseline": baseline, "loads": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
