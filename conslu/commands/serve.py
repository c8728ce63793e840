"""``conslu serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-wait-ms M]
[--device D] [--dtype T] [--max-body-mb MB] [--max-seconds S]``: the model behind an HTTP API with
dynamic batching, and a page at ``/`` to try it (:mod:`conslu.service`). Exit 2 for a model that
cannot be loaded or unusable options."""

from __future__ import annotations

import argparse
import sys

from conslu.commands._options import add_device_argument, add_dtype_argument, add_model_argument, usage_error

NAME = "serve"
HELP = "serve a model over HTTP (batched parsing, a web page)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body accepted")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest audio accepted")
    add_device_argument(p)
    add_dtype_argument(p)


def run(args: argparse.Namespace) -> int:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-wait-ms", args.max_wait_ms, 0),
                             ("--port", args.port, 0)):
        if value < low:
            return usage_error(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.max_seconds <= 30:
        return usage_error(f"--max-seconds must be in (0, 30] (Whisper's window), got {args.max_seconds}")
    if args.max_body_mb <= 0:
        return usage_error(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    try:
        import uvicorn

        from conslu.service import ServeOptions, create_app
    except ImportError as e:
        return usage_error(f"conslu serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn python-multipart")
    from conslu import parse
    from conslu.commands._options import quiet_transformers

    quiet_transformers()
    try:
        model = parse.load_model(args.model, args.device, "model", args.dtype)
    except Exception as e:  # noqa: BLE001 - one clear line
        return usage_error(parse.model_error(args.model, e))
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_body_bytes=int(args.max_body_mb * 2**20), max_seconds=args.max_seconds)
    app = create_app(model, name=args.model, options=options)
    print(f"conslu serve: {args.model} on {model.device}, http://{args.host}:{args.port}/ "
          f"(batches of up to {args.max_batch}, {args.max_wait_ms:g} ms wait)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except (OSError, SystemExit) as e:
        return usage_error(f"cannot serve on {args.host}:{args.port}: {e}")
    return 0
