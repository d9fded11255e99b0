"""lmms-eval model `vargpt`: runs a `VARGPTPipeline` under the unmodified lmms-eval harness (no fork).

lmms-eval (0.7 and later) finds third-party models through the Python entry-point group `lmms_eval.models`:
each entry point loads to a `ModelManifest` (or a callable returning one) naming the model class by import path.
`model_manifest` below is that callable; the package declares it in pyproject.toml:

    [project.entry-points."lmms_eval.models"]
    vargpt = "vargpt.evaluation.lmms_plugin:model_manifest"

after which `lmms-eval --model vargpt --model_args pretrained=DIR_OR_PRESET ...` works like any built-in model.
Importing this module needs lmms-eval installed (the `lmms` extra).

Several processes (`accelerate launch --num_processes=N -m lmms_eval ...` or `torchrun`): lmms-eval's evaluator
shards the documents by rank itself (`build_all_requests(rank=, world_size=)`), pads the ranks to equal request
counts and gathers the logged samples and metrics on rank 0. The model's share of that work is to report its
`rank` / `world_size` and to sit on its own device; it must not split or gather requests again. One process per
GPU on a machine with 8:

    accelerate launch --num_processes=8 -m lmms_eval --model vargpt --model_args pretrained=DIR --tasks mmbench_en_dev

Video tasks work too: a visual that is a video file path (`.mp4`, `.webm`, `.mkv`, `.mov`, `.avi`, `.m4v`, as
lmms-eval's video tasks give them) is decoded with PyAV (the `video` extra) and sampled as Qwen2-VL samples videos;
`video_fps` and `video_max_frames` (model_args) change the sampling.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm.auto import tqdm

from ..pipeline import VARGPTPipeline, default_model_name
from ..rope_index import FORWARD_POSITIONS
from ..video_io import VIDEO_FPS, VIDEO_MAX_FRAMES, VideoSampling, load_video

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "vargpt"
logger = logging.getLogger(__name__)

# Generation settings lmms-eval tasks commonly pass that have no meaning for this model's greedy / sampled decoding.
_SILENTLY_IGNORED_KEYS = frozenset({"image_aspect_ratio", "use_cache"})
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a")


def model_manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: registers `VARGPTLmms` as the simple (doc_to_visual) model `vargpt`.

    `ModelManifest` is imported here, not at module level: importing `lmms_eval.models` runs the registry, which
    loads this entry point, so a module-level import would hand the registry a half-initialised module.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{VARGPTLmms.__name__}")


class VARGPTLmms(lmms):
    """lmms-eval adapter: `generate_until` in batches through `VARGPTPipeline.chat_batch`, `loglikelihood` through
    the model's forward pass.

    `pretrained` is a checkpoint directory (original layout), a shipped model name or a preset ("tiny"); without
    it, the model every vargpt command defaults to (`default_model_name()`).
    `max_new_tokens` is the default when a task's generation settings do not give one.
    `positions` ("mrope" / "sequential") sets the rotary positions of log-likelihood scoring; the default, the
    model's `forward_positions`, is "mrope": what `generate_until` uses, so both request types see one model.

    Under several processes each one loads the model on its own device (see `process_device`): `device` may then
    name a device type ("cuda", "cpu") but not one indexed device, which every process would share.
    `video_fps` / `video_max_frames` set how video files are sampled (Qwen2-VL's defaults: 2 fps, at most 768).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        seed: int = 0,
        max_batch_size: int | None = None,
        positions: str | None = None,
        video_fps: float = VIDEO_FPS,
        video_max_frames: int = VIDEO_MAX_FRAMES,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown vargpt model_args: {', '.join(sorted(unknown))}")
        if str(batch_size).startswith("auto"):
            raise ValueError("vargpt needs an integer --batch_size (auto batch sizing is not supported)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        name = str(pretrained) if pretrained is not None else default_model_name()
        if positions is not None and positions not in FORWARD_POSITIONS:
            raise ValueError(f"positions must be one of {FORWARD_POSITIONS}, got {positions!r}")
        self.positions = positions
        self.video_sampling = VideoSampling(
            fps=float(video_fps), max_frames=int(video_max_frames), min_frames=min(4, int(video_max_frames))
        )
        self._rank, self._world_size, local_rank = launcher_ranks(os.environ)
        device = process_device(device, local_rank, self._world_size, torch.cuda.device_count())
        self.pipe = VARGPTPipeline.from_pretrained(name, device=device, dtype=dtype, seed=int(seed))
        if self._world_size > 1:
            eval_logger.info(f"vargpt: process {self._rank} of {self._world_size} on {self.pipe.device}")
            atexit.register(release_process_group)
        self._batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    # -- lmms-eval request types ---------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests with equal generation settings share batches of `batch_size`."""
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="vargpt generate_until", disable=self.rank != 0)
        for indices in _group_by_generation_kwargs(requests):
            until, max_new_tokens, settings = self._generation_settings(requests[indices[0]].args[1])
            for batch in _chunks(indices, self.batch_size):
                texts, images, videos = [], [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    texts.append(_strip_image_tags(context))
                    request_images, request_videos = _visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
                    images.append(request_images)
                    videos.append(request_videos)
                replies = self._answers(texts, images, videos, max_new_tokens, settings)
                for i, reply in zip(batch, replies, strict=True):
                    answers[i] = _truncate(reply, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                progress.update(len(batch))
        progress.close()
        return [a if a is not None else "" for a in answers]

    def _answers(
        self,
        texts: list[str],
        images: list[list[Image.Image | str]],
        videos: list[list[str]],
        max_new_tokens: int,
        settings: dict[str, Any],
    ) -> list[str]:
        """One batch's answers: in one `chat_batch` call without videos; with videos, one text-only turn each."""
        if not any(videos):
            return self.pipe.chat_batch(texts, images, max_new_tokens=max_new_tokens, **settings)
        return [
            self.pipe.converse(
                text,
                images=row_images,
                videos=[load_video(path, self.video_sampling) for path in row_videos],
                allow_images=False,
                max_new_tokens=max_new_tokens,
                **settings,
            ).text
            for text, row_images, row_videos in zip(texts, images, videos, strict=True)
        ]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | context, images), whether greedy decoding would produce the continuation).

        One forward pass per request: multiple-choice tasks are short and each request carries its own images.
        """
        results = []
        for request in tqdm(requests, desc="vargpt loglikelihood", disable=self.rank != 0):
            if len(request.args) < 6:
                raise ValueError("vargpt scores continuations given a context only (no unconditional acc_mutual_info)")
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if not isinstance(continuation, str):
                raise ValueError(
                    f"loglikelihood needs a text continuation, the task gave {type(continuation).__name__}"
                )
            visuals, videos = _visuals(doc_to_visual(doc)) if doc_to_visual is not None else ([], [])
            result = self.continuation_logprob(_strip_image_tags(context), continuation, visuals, videos)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vargpt lmms-eval model answers single-round tasks only")

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def continuation_logprob(
        self,
        context: str,
        continuation: str,
        images: Sequence[Image.Image | str] = (),
        videos: Sequence[str] = (),
    ) -> tuple[float, bool]:
        """Sum of the continuation tokens' log-probabilities after the chat prompt for (images, videos, context);
        `videos` are video file paths, decoded with this model's `video_sampling`.

        The continuation is tokenised on its own and appended to the prompt's ids (which end with the assistant
        header), so the scored tokens are exactly those the model would have to generate.
        """
        if not context.strip():
            raise ValueError("the context is empty: give some text")
        processor = self.pipe.processor
        cont_ids = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont_ids:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content += [{"type": "video"} for _ in videos]
        content.append({"type": "text", "text": context})
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        frames = [load_video(path, self.video_sampling) for path in videos]
        enc = processor(text=[prompt], images=list(images) or None, videos=frames or None, return_tensors="pt")
        prompt_len = enc["input_ids"].shape[1]
        cont_1N = torch.tensor([cont_ids], dtype=enc["input_ids"].dtype)
        visual_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in visual_keys}
        inputs["input_ids"] = torch.cat([enc["input_ids"], cont_1N], dim=1).to(self.device)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        logits_NV = self.pipe.model(**inputs, positions=self.positions).logits[0, prompt_len - 1 : -1].float()
        logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
        target_N = cont_1N[0].to(logprobs_NV.device)
        total = logprobs_NV.gather(1, target_N[:, None]).sum().item()
        greedy = bool((logprobs_NV.argmax(dim=-1) == target_N).all())
        return total, greedy

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
        """lmms-eval generation kwargs -> (stop strings, max_new_tokens, `generate` settings)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}")
        max_new_tokens = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kwargs.pop("do_sample", temperature > 0))
        top_p = kwargs.pop("top_p", None)
        top_k = kwargs.pop("top_k", None)
        num_beams = int(kwargs.pop("num_beams", 1) or 1)
        settings: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            settings["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                settings["top_p"] = float(top_p)
            if top_k is not None:
                settings["top_k"] = int(top_k)
        if num_beams > 1:
            raise ValueError(
                f"vargpt decodes greedily or by sampling; beam search (num_beams={num_beams}) is not supported"
            )
        if "repetition_penalty" in kwargs:
            settings["repetition_penalty"] = float(kwargs.pop("repetition_penalty"))
        ignored = sorted(set(kwargs) - _SILENTLY_IGNORED_KEYS)
        if ignored:
            logger.warning("vargpt ignores these generation settings: %s", ", ".join(ignored))
        return [u for u in until if u], max_new_tokens, settings


def release_process_group() -> None:
    """Destroy the default process group, if one is still up, before the interpreter tears down.

    lmms-eval leaves it to interpreter teardown, where gloo's worker threads can be destroyed while joinable: a rank
    that had finished its work then died of SIGABRT ("terminate called without an active exception", seen once in
    CI with two CPU processes) and the launcher reported the whole run failed. Registered with `atexit` (once per
    process: registering the same function again only repeats a no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launcher_ranks(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process, from the variables torchrun and `accelerate launch` set.

    These are what lmms-eval's evaluator reads to shard the documents, so model and evaluator always agree.
    accelerate's `PartialState` is not asked: on a machine without GPUs it reports one process under a
    multi-process launch unless built with `cpu=True`, and lmms-eval has already built it without.
    """
    try:
        rank = int(environ.get("RANK", 0))
        world_size = int(environ.get("WORLD_SIZE", 1))
        local_rank = int(environ.get("LOCAL_RANK", rank if world_size > 1 else 0))
    except ValueError as error:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {error}") from None
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise ValueError(
            f"inconsistent launcher variables: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}"
        )
    return rank, world_size, local_rank


def process_device(
    requested: str | torch.device | None, local_rank: int, num_processes: int, cuda_devices: int
) -> torch.device | None:
    """The device this process loads the model on.

    One process: `requested` as given (None: the pipeline's default, the first GPU or the CPU). Several processes
    on one machine must not all land on the first GPU: without a request each takes `cuda:{local_rank}` where
    GPUs exist, else the CPU; a device type without an index gets this process's index; an indexed device is
    refused, since every process would load onto it.
    """
    if num_processes == 1:
        return torch.device(requested) if requested is not None else None
    device = torch.device(requested if requested is not None else ("cuda" if cuda_devices else "cpu"))
    if device.index is not None:
        raise ValueError(
            f"device={requested} would put all {num_processes} processes on one device: leave device out "
            f"(each process then takes {device.type}:<local rank>) or give the device type {device.type!r}"
        )
    if device.type in ("cpu", "mps", "meta"):
        return device
    if device.type == "cuda" and local_rank >= cuda_devices:
        raise ValueError(
            f"process with local rank {local_rank} has no GPU of its own: this machine has {cuda_devices}; "
            "launch at most that many processes per machine"
        )
    return torch.device(device.type, local_rank)


def _group_by_generation_kwargs(requests: Sequence[Instance]) -> Iterator[list[int]]:
    """Indices of requests grouped by their generation settings, groups and members in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        key = json.dumps(request.args[1], sort_keys=True, default=repr)
        groups.setdefault(key, []).append(i)
    yield from groups.values()


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _strip_image_tags(context: str) -> str:
    """Images and videos go before the text in our chat template; tasks that inline `<image>` or `<video>` markers
    lose them here."""
    return context.replace("<image>", "").replace("<video>", "").strip()


def _truncate(text: str, until: Sequence[str]) -> str:
    """Cut at the first stop string, as lmms-eval's `until` asks."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _visuals(visuals: Any) -> tuple[list[Image.Image | str], list[str]]:
    """A task's `doc_to_visual` output as (images: PIL images or image file paths, videos: video file paths), each
    flat and in the task's order. Video files are told apart by their extension, as lmms-eval's own models do."""
    images: list[Image.Image | str] = []
    videos: list[str] = []
    if visuals is None:
        return images, videos
    for item in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(item, (list, tuple)):
            more_images, more_videos = _visuals(item)
            images += more_images
            videos += more_videos
        elif isinstance(item, Image.Image):
            images.append(item)
        elif isinstance(item, (str, os.PathLike)) and not str(item).lower().endswith(AUDIO_EXTENSIONS):
            is_video = str(item).lower().endswith(VIDEO_EXTENSIONS)
            (videos if is_video else images).append(os.fspath(item))
        else:
            raise ValueError(f"vargpt understands images and videos, the task gave {type(item).__name__}: {item!r:.80}")
    return images, videos


__all__ = ["MODEL_ID", "VARGPTLmms", "launcher_ranks", "model_manifest", "process_device"]
