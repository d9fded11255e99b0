"""The lmms-eval plugin: entry-point discovery, batched generate_until, loglikelihood, and the real lmms-eval CLI
on a shapes-world VQA task reporting the same accuracy as `vargpt eval shapes`, in one process and across two.

Skipped when lmms-eval is not installed (the `lmms` extra).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from itertools import pairwise
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance

from vargpt import VARGPTPipeline
from vargpt.evaluation.lmms_plugin import VARGPTLmms, _visuals, launcher_ranks, model_manifest, process_device
from vargpt.evaluation.lmms_tasks.shapes_vqa import shapes_vqa_documents, write_shapes_vqa_task
from vargpt.shapes.dataset import write_sharegpt_dataset
from vargpt.shapes.evaluate import evaluate_split
from vargpt.shapes.scoring import normalize_answer

BATCH = 4
MAX_NEW_TOKENS = 12  # what `vargpt eval shapes` and the task template both use
TWO_PROCESS_LIMIT = 7  # odd: one rank gets a padding request, which must not reach the results
CPU_2PROC_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu-2proc.yaml"


def _steer_to_constant_answer(pipe: VARGPTPipeline, answer: str) -> None:
    """Make the LLM answer `answer` to every question, greedily.

    Zeroing each decoder layer's output projections leaves the residual stream equal to the current token's
    embedding, so the next token depends on the current token only; the LM head then gets one row per step of
    the chain (last prompt token -> answer bytes -> EOS) pointing at the normalised embedding of its source.
    """
    model, tokenizer = pipe.model, pipe.processor.tokenizer
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and name.endswith(("self_attn.o_proj", "mlp.down_proj")):
                module.weight.zero_()
        prompt = pipe.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "q"}]}], add_generation_prompt=True, tokenize=False
        )
        chain = [tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]]
        chain += tokenizer(answer, add_special_tokens=False)["input_ids"]
        chain.append(model.generation_config.eos_token_id)
        norm = dict(model.named_modules())["model.norm"]
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for source, target in pairwise(chain):
            h = norm(embed[source])
            head[target] = 20.0 * h / h.norm()


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """24 understanding rows: 4 captions (which both evaluations leave out) and 20 questions, 3 answered "yes"."""
    return write_sharegpt_dataset(tmp_path_factory.mktemp("shapes"), "test", 24, 0, 0, seed=4)


@pytest.fixture(scope="module")
def task_dir(split, tmp_path_factory) -> Path:
    return write_shapes_vqa_task(split, tmp_path_factory.mktemp("task")).parent


@pytest.fixture(scope="module")
def yes_model_dir(tmp_path_factory) -> Path:
    pipe = VARGPTPipeline.from_pretrained("tiny")
    _steer_to_constant_answer(pipe, "yes")
    out = tmp_path_factory.mktemp("yes_model")
    pipe.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_lmms_eval(
    pretrained: str | Path, task_dir: Path, out: Path, processes: int = 1, limit: int | None = None
) -> subprocess.Popen:
    """The real CLI in a subprocess (the two CLI tests' runs overlap to halve the wall time on 2+ cores).

    Several processes go through `accelerate launch` with the CPU config (gloo), on a free port so that runs
    side by side do not meet, and with GPUs hidden so the test means the same on a GPU machine.
    """
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        env["CUDA_VISIBLE_DEVICES"] = ""
        launcher += ["-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC_CONFIG)]
        launcher += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
    command = [
        *launcher,
        "-m",
        "lmms_eval",
        "--model",
        "vargpt",
        "--model_args",
        f"pretrained={pretrained}",
        "--tasks",
        "shapes_vqa",
        "--include_path",
        str(task_dir),
        "--batch_size",
        str(BATCH),
        "--log_samples",
        "--output_path",
        str(out / "results"),
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    return subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish_lmms_eval(process: subprocess.Popen, out: Path) -> tuple[float, list[dict], str]:
    """(accuracy lmms-eval reports, its logged samples in document order, its log)."""
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-5000:]
    # lmms-eval logs some failures (an incompatible dependency, say) and still exits 0: show its log then
    results_files = list((out / "results").rglob("*_results.json"))
    samples_files = list((out / "results").rglob("*_samples_shapes_vqa.jsonl"))
    assert len(results_files) == len(samples_files) == 1, f"lmms-eval wrote no single result; its log:\n{log[-5000:]}"
    (results_file,), (samples_file,) = results_files, samples_files
    accuracy = json.loads(results_file.read_text())["results"]["shapes_vqa"]["accuracy,none"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return accuracy, sorted(samples, key=lambda s: s["doc_id"]), log


def _run_all(starts: dict[str, tuple[Path, subprocess.Popen]]) -> dict[str, tuple[float, list[dict], str]]:
    try:
        return {name: _finish_lmms_eval(process, out) for name, (out, process) in starts.items()}
    finally:
        for _, process in starts.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def cli_results(task_dir, yes_model_dir, tmp_path_factory) -> dict[str, tuple[float, list[dict], str]]:
    """lmms-eval on the random `tiny` preset and on the always-"yes" model."""
    starts = {}
    for name, pretrained in (("tiny", "tiny"), ("yes", yes_model_dir)):
        out = tmp_path_factory.mktemp(f"lmms_{name}")
        starts[name] = (out, _start_lmms_eval(pretrained, task_dir, out))
    return _run_all(starts)


@pytest.fixture(scope="module")
def two_process_results(task_dir, yes_model_dir, tmp_path_factory) -> dict[str, tuple[float, list[dict], str]]:
    """The same two models under `accelerate launch` with two CPU processes, on the first documents."""
    starts = {}
    for name, pretrained in (("tiny", "tiny"), ("yes", yes_model_dir)):
        out = tmp_path_factory.mktemp(f"lmms_2proc_{name}")
        starts[name] = (out, _start_lmms_eval(pretrained, task_dir, out, processes=2, limit=TWO_PROCESS_LIMIT))
    return _run_all(starts)


def _response(sample: dict) -> str:
    response = sample["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def _plugin_with_docs(pretrained: str | Path, docs: list[dict], batch_size: int = 2) -> VARGPTLmms:
    plugin = VARGPTLmms(pretrained=str(pretrained), batch_size=batch_size)
    plugin.task_dict = {"t": {"test": docs}}
    return plugin


def _request(kind: str, context: str, second, doc_id: int = 0) -> Instance:
    def doc_to_visual(doc):
        return [doc["image"]]

    arguments = (context, second, doc_to_visual, doc_id, "t", "test")
    return Instance(
        request_type=kind, arguments=arguments, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1}
    )


# ---------------------------------------------------------------- discovery and the task files


def test_the_entry_point_registers_the_vargpt_model():
    from lmms_eval.models import get_model

    (entry,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vargpt"]
    assert entry.value == "vargpt.evaluation.lmms_plugin:model_manifest"
    manifest = model_manifest()
    assert (manifest.model_id, manifest.simple_class_path) == ("vargpt", "vargpt.evaluation.lmms_plugin.VARGPTLmms")
    assert get_model("vargpt") is VARGPTLmms


def test_task_documents_are_the_vqa_rows_vargpt_eval_scores(split, task_dir):
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    vqa = [r for r in rows if r["meta"]["task"] == "understanding" and r["meta"]["category"] != "caption"]
    assert 0 < len(vqa) < len(rows)  # the split has captions to leave out
    docs = [json.loads(line) for line in (task_dir / "shapes_vqa.jsonl").read_text().splitlines()]
    assert [d["answer"] for d in docs] == [r["meta"]["answer"] for r in vqa]
    assert [d["question"] for d in docs] == [r["messages"][0]["content"].removeprefix("<image>") for r in vqa]
    assert all(Path(d["image"]).is_absolute() and Path(d["image"]).is_file() for d in docs)
    assert [d["id"] for d in shapes_vqa_documents(split, limit=3)] == [0, 1, 2]
    yaml_text = (task_dir / "shapes_vqa.yaml").read_text()
    assert 'task: "shapes_vqa"' in yaml_text and str(task_dir / "shapes_vqa.jsonl") in yaml_text


def test_task_writer_rejects_bad_input(split, tmp_path):
    with pytest.raises(ValueError, match="task_name"):
        write_shapes_vqa_task(split, tmp_path, task_name="shapes vqa")
    with pytest.raises(ValueError, match="limit"):
        shapes_vqa_documents(split, limit=0)
    generation_only = write_sharegpt_dataset(tmp_path / "gen", "test", 0, 2, 0, seed=1)
    with pytest.raises(ValueError, match="no VQA rows"):
        shapes_vqa_documents(generation_only)


# ---------------------------------------------------------------- the model class in process


def test_generate_until_keeps_request_order_across_generation_settings(split, yes_model_dir):
    docs = shapes_vqa_documents(split, limit=3)
    plugin = _plugin_with_docs(yes_model_dir, docs)
    long, short, stop = {"max_new_tokens": 12, "until": []}, {"max_new_tokens": 2}, {"until": ["s"]}
    settings = [long, short, long, stop, short]
    requests = [_request("generate_until", "Is there a square?", dict(s), i % 3) for i, s in enumerate(settings)]
    assert plugin.generate_until(requests) == ["yes", "ye", "yes", "ye", "ye"]
    with pytest.raises(ValueError, match="beam search"):
        plugin.generate_until([_request("generate_until", "Is there a square?", {"num_beams": 3})])
    with pytest.raises(NotImplementedError):
        plugin.generate_until_multi_round(requests)


def test_loglikelihood_of_the_steered_answer(split, yes_model_dir):
    docs = shapes_vqa_documents(split, limit=1)
    plugin = _plugin_with_docs(yes_model_dir, docs)
    yes, no, by_target = plugin.loglikelihood(
        [
            _request("loglikelihood", "Is there a square?", "yes"),
            _request("loglikelihood", "Is there a square?", "no"),
            _request("loglikelihood", "Is there a square?", lambda doc: "yes"),  # a task's doc_to_target
        ]
    )
    assert yes[1] and not no[1]
    assert -1e-3 < yes[0] <= 0.0 and no[0] < -10.0
    assert by_target == yes


def test_loglikelihood_of_a_longer_continuation_is_lower(split):
    docs = shapes_vqa_documents(split, limit=1)
    plugin = _plugin_with_docs("tiny", docs)
    question = docs[0]["question"]
    (short, _), (longer, _) = plugin.loglikelihood(
        [_request("loglikelihood", question, "red"), _request("loglikelihood", question, "red circle")]
    )
    assert longer < short < 0.0
    with pytest.raises(ValueError, match="no tokens"):
        plugin.continuation_logprob(question, "", [docs[0]["image"]])


def test_loglikelihood_positions_follow_the_model_arg(split):
    """Log-likelihoods use generate's M-RoPE by default; `positions=sequential` gives the original's 1-D
    forward positions, which change the score of an answer after an image."""
    docs = shapes_vqa_documents(split, limit=1)
    question, image = docs[0]["question"], docs[0]["image"]
    default = _plugin_with_docs("tiny", docs)
    scores = {
        mode: VARGPTLmms(pretrained="tiny", positions=mode).continuation_logprob(question, "red", [image])[0]
        for mode in ("mrope", "sequential")
    }
    assert default.continuation_logprob(question, "red", [image])[0] == scores["mrope"]
    assert scores["sequential"] != scores["mrope"]
    with pytest.raises(ValueError, match="positions must be one of"):
        VARGPTLmms(pretrained="tiny", positions="1d")


def test_model_args_are_checked():
    with pytest.raises(ValueError, match="unknown vargpt model_args: colour"):
        VARGPTLmms(pretrained="tiny", colour="red")
    with pytest.raises(ValueError, match="auto"):
        VARGPTLmms(pretrained="tiny", batch_size="auto")


# ---------------------------------------------------------------- several processes


def test_launcher_ranks_read_torchrun_and_accelerate_variables():
    assert launcher_ranks({}) == (0, 1, 0)
    assert launcher_ranks({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (5, 8, 1)
    assert launcher_ranks({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 1)  # no LOCAL_RANK: one machine
    with pytest.raises(ValueError, match="inconsistent launcher variables"):
        launcher_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="must be integers"):
        launcher_ranks({"RANK": "one", "WORLD_SIZE": "2"})


def test_each_process_gets_its_own_device():
    cpu, cuda = torch.device("cpu"), torch.device
    assert process_device(None, 0, 1, cuda_devices=2) is None  # one process: the pipeline's default
    assert process_device("cuda:1", 0, 1, cuda_devices=2) == cuda("cuda", 1)
    assert process_device(None, 1, 2, cuda_devices=2) == cuda("cuda", 1)
    assert process_device("cuda", 1, 2, cuda_devices=2) == cuda("cuda", 1)
    assert process_device(None, 1, 2, cuda_devices=0) == cpu
    assert process_device("cpu", 1, 2, cuda_devices=2) == cpu
    with pytest.raises(ValueError, match="would put all 2 processes on one device"):
        process_device("cuda:0", 1, 2, cuda_devices=2)
    with pytest.raises(ValueError, match="no GPU of its own"):
        process_device(None, 2, 4, cuda_devices=2)


def test_the_plugin_reports_the_launchers_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    plugin = VARGPTLmms(pretrained="tiny", device="cpu")  # a device type is fine, all processes may use the CPU
    assert (plugin.rank, plugin.world_size, plugin.device) == (1, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="one device"):
        VARGPTLmms(pretrained="tiny", device="cuda:0")


# ---------------------------------------------------------------- the real lmms-eval CLI


def test_lmms_eval_cli_answers_row_by_row_like_the_pipeline(split, cli_results):
    """A random model's answers depend on image and question: every row must match `chat_batch`'s answer."""
    accuracy, samples, _ = cli_results["tiny"]
    docs = shapes_vqa_documents(split)
    pipe = VARGPTPipeline.from_pretrained("tiny")
    expected = []
    for start in range(0, len(docs), BATCH):
        chunk = docs[start : start + BATCH]
        expected += pipe.chat_batch([d["question"] for d in chunk], [[d["image"]] for d in chunk], max_new_tokens=12)
    assert len(set(expected)) > 1  # the answers really depend on the input
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    assert [_response(s) for s in samples] == expected
    assert [s["target"] for s in samples] == [d["answer"] for d in docs]
    assert accuracy == evaluate_split(pipe, split, batch_size=BATCH, progress=False)["understanding"]["accuracy"]


def test_lmms_eval_cli_accuracy_equals_vargpt_eval_shapes(split, yes_model_dir, cli_results):
    """A model that always says "yes" is right on exactly the yes-rows, under both harnesses."""
    accuracy, samples, _ = cli_results["yes"]
    report = evaluate_split(VARGPTPipeline.from_pretrained(yes_model_dir), split, batch_size=BATCH, progress=False)
    docs = shapes_vqa_documents(split)
    hits = [float(normalize_answer(d["answer"]) == "yes") for d in docs]
    assert [s["accuracy"] for s in samples] == hits
    assert 0.0 < accuracy < 1.0
    assert accuracy == pytest.approx(report["understanding"]["accuracy"], abs=1e-12)
    assert report["understanding"]["n"] == len(docs)


def test_two_processes_give_the_one_process_results(cli_results, two_process_results):
    """Each process reports its rank and sits on its own device; lmms-eval shards the documents (padding the
    shorter rank) and gathers them: every document is answered once, as in one process, with the same metric."""
    for name in ("tiny", "yes"):
        accuracy, samples, log = two_process_results[name]
        _, one_process_samples, _ = cli_results[name]
        first = one_process_samples[:TWO_PROCESS_LIMIT]
        assert "vargpt: process 0 of 2 on cpu" in log and "vargpt: process 1 of 2 on cpu" in log, log[-5000:]
        assert [s["doc_id"] for s in samples] == list(range(TWO_PROCESS_LIMIT))
        assert [_response(s) for s in samples] == [_response(s) for s in first]
        assert [s["accuracy"] for s in samples] == [s["accuracy"] for s in first]
        assert accuracy == pytest.approx(sum(s["accuracy"] for s in first) / len(first), abs=1e-12)
    assert len({_response(s) for s in two_process_results["tiny"][1]}) > 1  # answers depend on each document
    assert 0.0 < two_process_results["yes"][0] < 1.0  # a metric that could have come out differently


# ---------------------------------------------------------------- video tasks


def test_video_requests_are_decoded_and_answered(tmp_path):
    """A video task's visual is a video file path: generate_until answers it as the pipeline does, next to an
    image request in the same batch, and loglikelihood scores after the video."""
    from PIL import Image

    from tests.clips import moving_square, write_clip
    from vargpt.video_io import load_video

    clip = write_clip(tmp_path / "clip.mkv", moving_square(25))  # 2.5 s at 10 fps: 4 frames sampled
    picture = tmp_path / "still.png"
    Image.fromarray(moving_square(1)[0]).save(picture)
    plugin = _plugin_with_docs("tiny", [{"image": str(clip)}, {"image": str(picture)}])
    plugin.pipe.processor.video_min_pixels = plugin.pipe.processor.video_max_pixels = 56 * 56  # a short prompt
    settings = {"max_new_tokens": 3, "until": []}
    requests = [_request("generate_until", "What moves?", dict(settings), i) for i in (0, 1)]
    video_answer, image_answer = plugin.generate_until(requests)
    frames = load_video(clip, plugin.video_sampling)
    assert len(frames) == 4
    pipe = plugin.pipe
    assert video_answer == pipe.converse("What moves?", videos=[frames], allow_images=False, max_new_tokens=3).text
    assert image_answer == pipe.chat_batch(["What moves?"], [[str(picture)]], max_new_tokens=3, do_sample=False)[0]
    ((score, _),) = plugin.loglikelihood([_request("loglikelihood", "What moves?", "a square")])
    assert score < 0.0
    assert score != plugin.continuation_logprob("What moves?", "a square")[0]  # the video changes the score
    assert VARGPTLmms(pretrained="tiny", video_fps=1, video_max_frames=8).video_sampling.frame_count(100, 10.0) == 8
    with pytest.raises(ValueError, match="understands images and videos"):
        _visuals(["speech.wav"])
