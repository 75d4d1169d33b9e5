"""The asyncio/trio front door: requests in, StreamEvents out; model work stays on the step thread."""

from __future__ import annotations

import enum
import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ksdk.engine.config import EngineConfig
from ksdk.engine.llm_engine import LLMEngine, StepOutput
from ksdk.engine.loop_bridge import LoopBridge
from ksdk.engine.model_runner import CausalLM
from ksdk.engine.request import Detokenizer
from ksdk.engine.request_stream import Channel, ReasoningSplitter, RequestStream
from ksdk.engine.stats import EngineStats
from ksdk.errors import ContextLengthError, EngineBusyError, EngineClosedError, InvalidRequestError, KsdkError
from ksdk.outputs import ChatResult, CompletionResult, Usage
from ksdk.sampling import SamplingParams

__all__ = ["Engine", "EngineState"]

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"
    FAILED = "failed"


class Engine:
    """Continuous-batching inference over a paged MLA KV cache.

    Build with :meth:`from_gguf` (or from a loaded model and tokenizer), then ``async with engine:``.
    Works under asyncio and trio; the model runs on one background thread.
    """

    def __init__(self, model: CausalLM, tokenizer: Any, *, model_id: str, config: EngineConfig | None = None,
                 chat_template: Any = None, make_detokenizer: Callable[[], Detokenizer] | None = None,
                 make_reasoning_parser: Callable[[str], ReasoningSplitter] | None = None,
                 available_bytes: int | None = None) -> None:
        """``tokenizer`` follows ``ksdk.tokenizer.Tokenizer`` (encode, decode, eos_token_id, add_bos);
        ``make_detokenizer`` defaults to ``ksdk.tokenizer.IncrementalDetokenizer``; ``chat_template``
        (``ksdk.chat.ChatTemplate``) is needed for :meth:`stream`/:meth:`chat` only;
        ``make_reasoning_parser(rendered_prompt)`` splits chat output into reasoning and answer."""
        self.config = config or EngineConfig()
        self.model_id = model_id
        self.tokenizer = tokenizer
        self._model = model
        self._chat_template = chat_template
        self._make_reasoning_parser = make_reasoning_parser
        if make_detokenizer is None:
            from ksdk.tokenizer import IncrementalDetokenizer

            def make_detokenizer() -> Detokenizer:
                return IncrementalDetokenizer(tokenizer)

        eos = tokenizer.eos_token_id
        self._vocab_size: int = model.config.vocab_size  # type: ignore[attr-defined]
        self._core = LLMEngine(model, self.config, num_layers=model.config.num_layers,  # type: ignore[attr-defined]
                               context_length=model.config.context_length,  # type: ignore[attr-defined]
                               eos_token_ids=() if eos is None else (eos,),
                               token_text=lambda token_id: tokenizer.decode([token_id]),
                               make_detokenizer=make_detokenizer, available_bytes=available_bytes)
        self.max_model_len = self._core.max_model_len
        self.state = EngineState.CREATED
        self._channels: dict[str, Channel] = {}
        self._bridge: LoopBridge | None = None
        self._thread: threading.Thread | None = None
        self._stopped: anyio.Event | None = None
        self._failure: BaseException | None = None

    @classmethod
    def from_gguf(cls, path: str | Path, *, model_id: str | None = None, device: str = "auto",
                  max_model_len: int | None = None, kv_cache_tokens: int | None = None, page_size: int = 16,
                  max_num_seqs: int = 64, max_batch_tokens: int = 2048, max_waiting: int = 256,
                  enable_prefix_caching: bool = True, experts: str = "auto",
                  expert_threads: int | None = None, expert_memory: str = "mmap",
                  gpu_stream_threshold: int | None = None, gpu_expert_memory: int | str = 0,
                  cuda_graphs: str = "step") -> Engine:
        """Load model, tokenizer and chat template from a GGUF file (or its first split, or a folder).

        ``experts``, ``expert_threads``, ``expert_memory``, ``gpu_stream_threshold``, ``gpu_expert_memory`` (bytes,
        or a size such as "20GiB", of GPU memory for routed experts kept there): how routed experts run
        (ksdk.offload.ExpertOptions). The KV cache is sized after those experts are loaded. ``cuda_graphs`` (a model on a GPU): how decode steps replay CUDA graphs,
        "step" (the whole step, routed experts as host nodes), "attention" (each layer's attention) or "off"
        (DeepseekForCausalLM.cuda_graphs)."""
        from ksdk.offload.options import ExpertOptions, parse_bytes

        expert_options = ExpertOptions(backend=experts, threads=expert_threads, memory=expert_memory,  # type: ignore[arg-type]
                                       gpu_stream_threshold=gpu_stream_threshold,
                                       gpu_bytes=parse_bytes(gpu_expert_memory))
        import torch

        from ksdk.chat import ChatTemplate, prompt_opens_reasoning
        from ksdk.models import load_model
        from ksdk.reasoning import ReasoningParser
        from ksdk.tokenizer import Tokenizer
        from ksdk.weights.gguf_file import GGUFFile

        config = EngineConfig(max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens, page_size=page_size,
                              max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, max_waiting=max_waiting,
                              enable_prefix_caching=enable_prefix_caching)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gguf = GGUFFile.open(path)
        model = load_model(gguf, device=device, experts=expert_options)
        model.cuda_graphs = cuda_graphs  # type: ignore[assignment]  # raises InvalidRequestError for a bad name
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        template = ChatTemplate.from_metadata(gguf.metadata, tokenizer)
        name = model_id or gguf.metadata.get("general.name") or Path(path).stem
        return cls(model, tokenizer, model_id=str(name), config=config, chat_template=template,
                   make_reasoning_parser=lambda rendered: ReasoningParser(prompt_opens_reasoning(rendered)))

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not EngineState.CREATED:
            raise EngineClosedError(f"start() needs a new engine; this one is {self.state.value}")
        self._bridge = LoopBridge()
        self._stopped = anyio.Event()
        self._thread = threading.Thread(target=self._thread_main, name=f"ksdk-engine-{self.model_id}", daemon=True)
        self.state = EngineState.RUNNING
        self._thread.start()

    async def aclose(self) -> None:
        """Abort what is running, stop the step thread and wait for it (without blocking the loop)."""
        if self._thread is None or self.state is EngineState.CLOSED:
            self.state = EngineState.CLOSED
            return
        self.state = EngineState.CLOSED
        self._core.shutdown()
        assert self._stopped is not None
        with anyio.CancelScope(shield=True):
            await self._stopped.wait()
        self._thread.join()
        self._fail_channels(EngineClosedError("the engine was closed while the request ran"))

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- requests -----------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], *, request_id: str | None = None,
                 **sampling: Any) -> RequestStream:
        """Raw completion (no chat template); a string prompt gets BOS when the model's tokenizer asks."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos, allow_special=True))
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self._vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt: token id {bad[0]} is outside the vocabulary "
                                          f"(0 to {self._vocab_size - 1})")
        else:
            raise InvalidRequestError("prompt: expected a string or a list of token ids")
        return self._submit(ids, request_id, sampling, None)

    def stream(self, messages: list[dict], *, request_id: str | None = None, tools: list | None = None,
               **sampling: Any) -> RequestStream:
        """Chat: apply the model's template; events carry reasoning and answer text apart."""
        if self._chat_template is None:
            raise InvalidRequestError("messages: this engine has no chat template; use generate()")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InvalidRequestError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
        try:
            rendered = self._chat_template.render(messages, add_generation_prompt=True, tools=tools)
        except KsdkError:
            raise
        except Exception as exc:  # a template error is the request's fault
            raise InvalidRequestError(f"messages: the chat template could not render them: {exc}") from exc
        ids = list(self.tokenizer.encode(rendered, add_bos=False, allow_special=True))
        splitter = None
        if self._make_reasoning_parser is not None:
            make = self._make_reasoning_parser

            def splitter() -> ReasoningSplitter:
                return make(rendered)

        return self._submit(ids, request_id, sampling, splitter)

    async def chat(self, messages: list[dict], *, request_id: str | None = None, tools: list | None = None,
                   **sampling: Any) -> ChatResult:
        return await _collect(self.stream(messages, request_id=request_id, tools=tools, **sampling))

    async def complete(self, prompt: str | list[int], *, request_id: str | None = None,
                       **sampling: Any) -> ChatResult:
        return await _collect(self.generate(prompt, request_id=request_id, **sampling))

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason="abort"``. Unknown ids are ignored."""
        if self.state is EngineState.RUNNING:
            self._core.abort_request(request_id)

    def stats(self) -> EngineStats:
        return self._core.stats()

    # ---- internals ----------------------------------------------------------------------------------

    def _submit(self, ids: list[int], request_id: str | None, sampling: dict[str, Any],
                make_splitter: Callable[[], ReasoningSplitter] | None) -> RequestStream:
        params = SamplingParams.from_kwargs(**sampling)
        if self.state is not EngineState.RUNNING:
            detail = f": {self._failure!r}" if self._failure else ""
            raise EngineClosedError(f"the engine is {self.state.value}{detail}; use `async with engine:` "
                                    "or `await engine.start()` first")
        if not ids:
            raise InvalidRequestError("prompt: it is empty")
        room = self.max_model_len - len(ids)
        asked = sampling.get("max_tokens", params.max_tokens)  # the default shrinks to fit; an explicit value must fit
        if room < 1 or (asked is not None and "max_tokens" in sampling and asked > room):
            raise ContextLengthError(f"the prompt has {len(ids)} tokens and max_tokens is {asked}; "
                                     f"together they must fit max_model_len={self.max_model_len}")
        max_tokens = room if asked is None else min(asked, room)
        if self._core.num_waiting >= self.config.max_waiting:
            raise EngineBusyError(f"{self.config.max_waiting} requests are already waiting (max_waiting); retry later")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._channels:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in use by a running request")
        channel = Channel()
        self._channels[request_id] = channel
        self._core.add_request(request_id, tuple(ids), params, max_tokens)
        return RequestStream(request_id, params.n, channel, self._close_stream, make_splitter)

    def _close_stream(self, request_id: str, abort: bool) -> None:
        # may run from a finalizer: dict.pop and the core's queue are both safe there
        self._channels.pop(request_id, None)
        if abort and self.state is EngineState.RUNNING:
            self._core.abort_request(request_id)

    def _thread_main(self) -> None:
        assert self._bridge is not None and self._stopped is not None
        bridge = self._bridge
        try:
            self._core.run_forever(lambda outputs: bridge.call_soon(self._deliver, outputs))
        except BaseException as exc:  # a bug in the core: fail loudly, but never hang callers
            logger.exception("the engine's step loop failed")
            bridge.call_soon(self._on_core_failure, exc)
        finally:
            bridge.call_soon(self._stopped.set)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            channel = self._channels.get(out.request_id)
            if channel is not None:
                channel.put(out)

    def _on_core_failure(self, exc: BaseException) -> None:
        self._failure = exc
        self.state = EngineState.FAILED
        self._fail_channels(EngineClosedError(f"the engine failed: {exc!r}"))

    def _fail_channels(self, exc: BaseException) -> None:
        for request_id, channel in list(self._channels.items()):
            channel.put(StepOutput(request_id, error=exc))


async def _collect(stream: RequestStream) -> ChatResult:
    """Gather a stream into a ChatResult; usage counts the prompt once and every choice's tokens."""
    parts: dict[int, dict[str, Any]] = {}
    async for ev in stream:
        p = parts.setdefault(ev.index, {"text": [], "reasoning": [], "ids": [], "lps": [], "has_lp": False})
        p["text"].append(ev.text)
        p["reasoning"].append(ev.reasoning)
        p["ids"] += ev.token_ids
        if ev.logprobs is not None:
            p["has_lp"] = True
            p["lps"] += ev.logprobs
        if ev.finish_reason is not None:
            p["finish"], p["stop_reason"], p["usage"] = ev.finish_reason, ev.stop_reason, ev.usage
    choices = tuple(
        CompletionResult(index=i, text="".join(p["text"]), token_ids=tuple(p["ids"]), finish_reason=p["finish"],
                         reasoning="".join(p["reasoning"]), stop_reason=p["stop_reason"],
                         logprobs=tuple(p["lps"]) if p["has_lp"] else None)
        for i, p in sorted(parts.items()))
    usages = [parts[c.index]["usage"] for c in choices]
    usage = Usage(prompt_tokens=usages[0].prompt_tokens,
                  completion_tokens=sum(u.completion_tokens for u in usages), cached_tokens=usages[0].cached_tokens)
    return ChatResult(request_id=stream.request_id, choices=choices, usage=usage)

