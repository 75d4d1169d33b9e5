"""The ``ksdk`` command: ``serve`` an OpenAI-compatible API, ``chat`` in the terminal, ``generate`` a completion.

    ksdk serve [GGUF] [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--api-key KEY] [engine options]
    ksdk chat [GGUF] [--system TEXT] [--max-tokens N] [--temperature T] [engine options]
    ksdk generate GGUF "prompt" [--max-tokens N] [--temperature T] [--seed S] [engine options]

Without a GGUF, ``serve`` and ``chat`` use the built-in demo model (random weights: random text). Loading
reports progress on stderr; ``--quiet`` turns that off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from ksdk.errors import KsdkError

if TYPE_CHECKING:
    from ksdk.engine import Engine

__all__ = ["build_parser", "main"]

DEMO_NOTICE = ("no GGUF given: using the built-in demo model, a tiny DeepSeek-V3-architecture model with RANDOM "
               "weights and the real DeepSeek tokenizer. Its text is random; pass a GGUF path for a real model.")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine options")
    g.add_argument("--model-name", help="the model id to serve and report (default: the GGUF's general.name)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--max-model-len", type=int, help="context window in tokens (default: the model's)")
    g.add_argument("--kv-cache-tokens", type=int, help="KV cache size in tokens (default: sized from free memory)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch (default: 64)")
    g.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per step (default: 2048)")
    g.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default: 256)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV pages of shared prefixes")
    g.add_argument("--experts", choices=("auto", "native", "torch"), default="auto",
                   help="routed experts: native CPU kernels on the GGUF blocks, or torch (default: auto = native "
                        "when built and every expert type has a kernel)")
    g.add_argument("--expert-threads", type=int, default=None,
                   help="native expert worker threads (default: physical cores - 1)")
    g.add_argument("--expert-memory", choices=("mmap", "ram", "locked"), default="mmap",
                   help="read experts from the memory-mapped file, copy them into RAM, or copy and mlock them")
    g.add_argument("--gpu-stream-threshold", type=int, default=None,
                   help="with a GPU: batches of at least this many tokens stream their experts to the GPU "
                        "(default: measured at the first long batch; 0: never)")
    g.add_argument("--gpu-expert-memory", type=_size, default=0, metavar="SIZE",
                   help="with a GPU: memory for routed experts kept on the GPU, shared by the MoE layers, e.g. "
                        "20GiB (default: 0, every routed expert on the CPU)")
    g.add_argument("--cuda-graphs", choices=("step", "attention", "off"), default="step",
                   help="with a GPU: decode steps replay one CUDA graph per step with the routed experts as host "
                        "nodes (step), per-layer attention graphs (attention), or no graphs (default: step)")
    g.add_argument("--quiet", action="store_true", help="no loading progress on stderr")


def _size(value: str) -> int:
    from ksdk.errors import InvalidRequestError
    from ksdk.offload.options import parse_bytes

    try:
        return parse_bytes(value)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksdk", description="Run DeepSeek-V3/R1 GGUF models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API on uvicorn")
    serve.add_argument("gguf", nargs="?", type=Path, help="a .gguf file, its first split, or a folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("KSDK_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $KSDK_API_KEY, else none)")
    serve.add_argument("--max-concurrency", type=int, default=64, help="generation requests at once before 429")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413")
    _add_engine_options(serve)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("gguf", nargs="?", type=Path, help="a .gguf file, its first split, or a folder")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--max-tokens", type=int, default=1024)
    chat.add_argument("--temperature", type=float, default=0.6)
    chat.add_argument("--hide-reasoning", action="store_true", help="do not print the <think> text")
    _add_engine_options(chat)

    gen = sub.add_parser("generate", help="print a raw completion of a prompt (no chat template), as it streams")
    gen.add_argument("gguf", type=Path, help="a .gguf file, its first split, or a folder")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    _add_engine_options(gen)
    return parser


def _model_path(args: argparse.Namespace) -> Path:
    if args.gguf is not None:
        return Path(args.gguf)
    from ksdk.testing import demo_model_path

    print(DEMO_NOTICE, file=sys.stderr)
    return demo_model_path()


def open_engine(args: argparse.Namespace) -> Engine:
    """Load the engine the options describe, reporting progress on stderr unless ``--quiet``."""
    from ksdk.engine import Engine

    path = _model_path(args)
    if not args.quiet:  # the engine logs its loading steps; a person is watching, so show them
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="ksdk: %(message)s")
        print(f"ksdk: loading {path} ...", file=sys.stderr)
    start = time.monotonic()
    engine = Engine.from_gguf(
        path, model_id=args.model_name, device=args.device, max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
        max_batch_tokens=args.max_batch_tokens, max_waiting=args.max_waiting,
        enable_prefix_caching=not args.no_prefix_caching, experts=args.experts, expert_threads=args.expert_threads,
        expert_memory=args.expert_memory, gpu_stream_threshold=args.gpu_stream_threshold,
        gpu_expert_memory=args.gpu_expert_memory, cuda_graphs=args.cuda_graphs,
    )
    if not args.quiet:
        print(f"ksdk: loaded {engine.model_id} in {time.monotonic() - start:.1f} s "
              f"(context {engine.max_model_len} tokens)", file=sys.stderr)
    return engine


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import gateway

    engine = open_engine(args)
    app = gateway.create_app(engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                             max_concurrency=args.max_concurrency, close_engine=True)
    print(f"ksdk: serving {engine.model_id!r} at http://{args.host}:{args.port}/v1 (OpenAI-compatible)"
          + (", API key required" if args.api_key else ""), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


async def _chat(engine: Engine, args: argparse.Namespace, out: TextIO) -> None:
    start: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    dim, reset = ("\x1b[2m", "\x1b[0m") if out.isatty() else ("", "")
    out.write(f"chatting with {engine.model_id} -- /reset starts over, /exit (or Ctrl-D) leaves\n")
    async with engine:
        while True:
            try:
                line = await anyio.to_thread.run_sync(input, "you> ")
            except EOFError:
                out.write("\n")
                return
            command = line.strip()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                history = list(start)
                continue
            if not command:
                continue
            history.append({"role": "user", "content": line})
            answer, in_reasoning = [], False
            try:
                async for ev in engine.stream(history, max_tokens=args.max_tokens, temperature=args.temperature):
                    if ev.reasoning and not args.hide_reasoning:
                        out.write(ev.reasoning if in_reasoning else f"{dim}[thinking] {ev.reasoning}")
                        in_reasoning = True
                    if ev.text:
                        out.write(f"{reset}\n" if in_reasoning else "")
                        in_reasoning = False
                        out.write(ev.text)
                        answer.append(ev.text)
                    out.flush()
            except KsdkError as exc:
                history.pop()  # the turn failed: forget it, so the next one can succeed
                out.write(f"{reset}\nerror: {exc}\n")
                continue
            out.write(f"{reset}\n")
            history.append({"role": "assistant", "content": "".join(answer)})


async def _generate(engine: Engine, args: argparse.Namespace, out: TextIO) -> None:
    async with engine:
        async for ev in engine.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                        seed=args.seed):
            out.write(ev.text)
            out.flush()
    out.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        engine = open_engine(args)
        run = _chat if args.command == "chat" else _generate
        anyio.run(run, engine, args, sys.stdout)
    except KsdkError as exc:
        print(f"ksdk: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
