"""Running the server: its command-line options and the uvicorn process (`vargpt serve`, `python -m vargpt.serving`)."""

from __future__ import annotations

import argparse
import logging

from ..cli.options import add_model_arguments, model_load_kwargs


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vargpt serve` and `python -m vargpt.serving`: the model's, then the server's limits."""
    add_model_arguments(parser)
    parser.add_argument("--model-name", default=None, help="id reported by /v1/models (default: the --model value)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per model call (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=64, help="waiting requests before 429 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request before 504 (default: 60)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit in MiB (default: 16)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="per input image (default: 16M)")
    parser.add_argument("--max-n", type=int, default=8, help="largest n of an image request (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096, help="default: %(default)s")
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="prompts longer than this are refused before tokenising (default: 8 x --max-prompt-tokens)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length when a request gives none")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of preset models (default: 0)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))


def config_from_args(args: argparse.Namespace):
    """A `ServerConfig` from the parsed options; bad values raise ValueError before the model loads."""
    from .app import ServerConfig

    for name in ("max_batch_size", "queue_size", "max_n", "max_prompt_tokens", "max_tokens", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    return ServerConfig(
        model_name=args.model_name or str(args.model),
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_n=args.max_n,
        max_prompt_tokens=args.max_prompt_tokens,
        max_prompt_chars=args.max_prompt_chars,
        default_max_tokens=args.max_tokens,
    )


def serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise ValueError(f"the server needs its extra dependencies: pip install 'vargpt[serve]' ({error})") from None
    from ..pipeline import VARGPTPipeline

    config = config_from_args(args)
    pipe = VARGPTPipeline.from_pretrained(args.model, seed=args.seed, **model_load_kwargs(args))
    warm_up(pipe)
    app = create_app(pipe, config)
    logging.getLogger("vargpt.serving").info("serving %s on http://%s:%d/v1", config.model_name, args.host, args.port)
    print(f"vargpt: serving {config.model_name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def warm_up(pipe) -> None:
    """One short answer and one image before accepting requests: the first call of a fresh process pays for lazy
    initialisation (seconds on a CPU), which would otherwise land on the first user's time limit."""
    pipe.chat("warm up", max_new_tokens=2)
    pipe.generate("warm up", seed=0)
