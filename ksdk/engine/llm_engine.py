"""The synchronous core: ``step()`` = schedule → run → postprocess, driven by one background thread."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from ksdk.engine.config import EngineConfig
from ksdk.engine.kv_cache import KVCache, KVCachePlan, available_memory_bytes
from ksdk.engine.model_runner import CausalLM, ModelRunner
from ksdk.engine.page_table import PageTable
from ksdk.engine.request import Detokenizer, Request, Sequence, SequenceStatus
from ksdk.engine.sampler import SampledTokens, Sampler
from ksdk.engine.scheduler import ScheduledBatch, Scheduler
from ksdk.engine.stats import EngineStats, StatsRecorder
from ksdk.errors import InvalidRequestError
from ksdk.outputs import StreamEvent, TokenLogprob, Usage
from ksdk.sampling import SamplingParams

__all__ = ["LLMEngine", "StepOutput"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """News for one request: an event for one of its choices, or the error that ended it."""

    request_id: str
    event: StreamEvent | None = None
    error: BaseException | None = None


class LLMEngine:
    """Owns the KV cache, page table, scheduler, model runner and sampler. ``add_request``,
    ``abort_request`` and ``shutdown`` may be called from any thread; everything else runs on the
    step thread."""

    def __init__(self, model: CausalLM, config: EngineConfig, *, num_layers: int, context_length: int,
                 eos_token_ids: tuple[int, ...], token_text: Callable[[int], str],
                 make_detokenizer: Callable[[], Detokenizer], available_bytes: int | None = None) -> None:
        device = torch.device(model.device)
        plan = KVCachePlan.build(
            num_layers=num_layers, kv_cache_dim=model.kv_cache_dim, dtype=model.kv_dtype,
            context_length=context_length, page_size=config.page_size, max_model_len=config.max_model_len,
            kv_cache_tokens=config.kv_cache_tokens, max_num_seqs=config.max_num_seqs,
            available_bytes=available_memory_bytes(device) if available_bytes is None else available_bytes)
        self.config = config
        self.device = device
        self.max_model_len = plan.max_model_len
        self.kv_cache = KVCache(plan, num_layers=num_layers, kv_cache_dim=model.kv_cache_dim, dtype=model.kv_dtype,
                                device=device)
        self.page_table = PageTable(plan.num_pages, plan.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.page_table, config.max_num_seqs, config.max_batch_tokens)
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler()
        self.recorder = StatsRecorder()
        self._eos_token_ids = eos_token_ids
        self._token_text = token_text
        self._make_detokenizer = make_detokenizer
        self._requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Request | str]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._pending_adds = 0
        self._num_waiting_requests = 0
        self._stopping = False

    # ---- any thread -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams,
                    max_tokens: int) -> None:
        req = Request.create(request_id, prompt_ids, params, max_tokens, self._eos_token_ids,
                             self._make_detokenizer, self.device, share_prompt=self.config.enable_prefix_caching)
        with self._lock:
            self._pending_adds += 1
        self._inbox.put(("add", req))
        self._wakeup.set()

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        """Requests not admitted yet, including those still in the inbox."""
        with self._lock:
            return self._pending_adds + self._num_waiting_requests

    def stats(self) -> EngineStats:
        pt = self.page_table
        return self.recorder.snapshot(
            running=len(self.scheduler.running), waiting=self.num_waiting, pages_total=pt.num_pages,
            pages_free=pt.num_free, hit_rate=pt.cache_hits / pt.cache_queries if pt.cache_queries else 0.0)

    # ---- step thread --------------------------------------------------------------------------------

    def run_forever(self, deliver: Callable[[list[StepOutput]], None]) -> None:
        """Step while there is work, sleep while there is none; on shutdown abort what is left."""
        while self._wait_for_work():
            outputs = self.step()
            if outputs:
                deliver(outputs)
        outputs = self._apply_commands()
        for rid in list(self._requests):
            outputs += self._abort(rid)
        if outputs:
            deliver(outputs)

    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        outputs = self._apply_commands()
        batch = self.scheduler.schedule()
        batch, sampled = self._run(batch, outputs)
        outputs += self._postprocess(batch, sampled, started)
        return outputs

    def _wait_for_work(self) -> bool:
        while not self._stopping:
            if not self._inbox.empty() or self.scheduler.has_work:
                return True
            self._wakeup.wait()
            self._wakeup.clear()
        return False

    def _apply_commands(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                assert isinstance(item, Request)
                duplicate = item.request_id in self._requests  # ids are unique among live requests
                with self._lock:  # moves from the inbox count to the waiting count in one go
                    self._pending_adds -= 1
                    self._num_waiting_requests += not duplicate
                if duplicate:
                    outputs.append(StepOutput(item.request_id, error=InvalidRequestError(
                        f"request_id: {item.request_id!r} is still in use by an earlier request")))
                    continue
                self._requests[item.request_id] = item
                for seq in item.sequences:
                    self.scheduler.add(seq)
            elif isinstance(item, str) and item in self._requests:
                outputs += self._abort(item)
        return outputs

    def _run(self, batch: ScheduledBatch, outputs: list[StepOutput]) -> tuple[ScheduledBatch, SampledTokens | None]:
        """Forward and sample; returns the batch that survived (failed requests are dropped from it)."""
        if not batch.seqs:
            return batch, None
        try:
            logits = self.runner.run(batch)
        except Exception:  # noqa: BLE001 - isolated per request below
            logger.warning("model step failed; rerunning its %d sequences one by one", len(batch.seqs))
            batch, logits = self._rerun_one_by_one(batch, outputs)
        if not batch.sampling_seqs:
            return batch, None
        try:
            return batch, self.sampler(logits, batch.sampling_seqs)
        except Exception as exc:  # noqa: BLE001 - reported to the requests that were sampling
            logger.exception("sampling failed")
            for rid in dict.fromkeys(s.request.request_id for s in batch.sampling_seqs):
                outputs += self._fail(rid, exc)
            return batch, None  # the other chunks of the batch still count as computed

    def _rerun_one_by_one(self, batch: ScheduledBatch, outputs: list[StepOutput]) -> tuple[ScheduledBatch,
                                                                                           torch.Tensor]:
        """Fail only the requests whose sequences fail alone (cache writes are idempotent: reruns are safe)."""
        done: list[tuple[Sequence, int, torch.Tensor | None]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not SequenceStatus.RUNNING:  # a failed sibling ended its request
                continue
            samples = seq in batch.sampling_seqs
            try:
                logits = self.runner.run(ScheduledBatch((seq,), (n,), (seq,) if samples else ()))
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                logger.exception("model step failed for request %s", seq.request.request_id)
                outputs += self._fail(seq.request.request_id, exc)
                continue
            done.append((seq, n, logits if samples else None))
        done = [d for d in done if d[0].status is SequenceStatus.RUNNING]
        rows = [d[2] for d in done if d[2] is not None]
        rebuilt = ScheduledBatch(tuple(d[0] for d in done), tuple(d[1] for d in done),
                                 tuple(d[0] for d in done if d[2] is not None))
        return rebuilt, torch.cat(rows) if rows else torch.empty(0)

    def _postprocess(self, batch: ScheduledBatch, sampled: SampledTokens | None, started: float) -> list[StepOutput]:
        prompt_tokens = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not SequenceStatus.RUNNING:  # failed in _run
                continue
            prompt_tokens += n if seq.num_computed_tokens < seq.num_prompt_tokens else 0
            seq.num_computed_tokens += n
            self.page_table.commit(seq)
            seq.prompt_done |= seq.num_computed_tokens >= seq.num_prompt_tokens
        outputs: list[StepOutput] = []
        if sampled is not None:
            for i, seq in enumerate(batch.sampling_seqs):
                if seq.status is not SequenceStatus.RUNNING:  # a sibling's failure ended its request
                    continue
                try:
                    outputs.append(StepOutput(seq.request.request_id, self._append_token(seq, sampled, i)))
                except Exception as exc:  # noqa: BLE001 - one request's failure stays its own
                    logger.exception("postprocessing request %s failed", seq.request.request_id)
                    outputs += self._fail(seq.request.request_id, exc)
        with self._lock:
            self._num_waiting_requests = len({s.request.request_id for s in self.scheduler.waiting
                                              if s.num_cached_tokens is None})
        self.recorder.record_step(step_s=time.perf_counter() - started, forward_s=self.runner.last_forward_s,
                                  computed=batch.num_tokens, prompt=prompt_tokens,
                                  generated=len(sampled.token_ids) if sampled else 0, preempted=batch.num_preempted)
        return outputs

    def _append_token(self, seq: Sequence, sampled: SampledTokens, i: int) -> StreamEvent:
        token = sampled.token_ids[i]
        seq.token_ids.append(token)
        req, params = seq.request, seq.request.params
        finish: str | None = None
        stop_reason: str | int | None = None
        text = ""
        if token in params.stop_token_ids:
            finish, stop_reason = "stop", token
        elif token in req.eos_token_ids and not params.ignore_eos:
            finish = "stop"
        else:
            text, stop = seq.stop_matcher.push(seq.detokenizer.push([token]))
            if stop is not None:
                finish, stop_reason = "stop", stop
            elif seq.num_output_tokens >= req.max_tokens:
                finish = "length"
        if finish is not None and not isinstance(stop_reason, str):  # ended otherwise: release held text
            tail, stop = seq.stop_matcher.push(seq.detokenizer.flush())
            text += tail + ("" if stop else seq.stop_matcher.flush())
            if stop is not None:
                finish, stop_reason = "stop", stop
        logprobs = self._logprobs(sampled, i) if params.logprobs or params.top_logprobs else None
        usage = None
        if finish is not None:
            self.scheduler.finish(seq)
            usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens or 0)
            self._retire(req, "requests_finished")
        return StreamEvent(req.request_id, seq.index, text, (token,), logprobs=logprobs,
                           finish_reason=finish, stop_reason=stop_reason, usage=usage)  # type: ignore[arg-type]

    def _logprobs(self, sampled: SampledTokens, i: int) -> tuple[TokenLogprob, ...]:
        token = sampled.token_ids[i]
        lp = sampled.logprobs[i]
        assert lp is not None
        top = tuple((t, self._token_text(t), v) for t, v in zip(sampled.top_ids[i], sampled.top_logprobs[i]))
        return (TokenLogprob(token, self._token_text(token), lp, top),)

    def _abort(self, request_id: str) -> list[StepOutput]:
        req = self._requests[request_id]
        outputs = []
        for seq in req.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq)
                usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens or 0)
                outputs.append(StepOutput(request_id, StreamEvent(request_id, seq.index, "", (),
                                                                  finish_reason="abort", usage=usage)))
        self._retire(req, "requests_aborted")
        return outputs

    def _fail(self, request_id: str, exc: BaseException) -> list[StepOutput]:
        req = self._requests.get(request_id)
        if req is None:
            return []
        for seq in req.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq)
        self._retire(req, "requests_failed")
        return [StepOutput(request_id, error=exc)]

    def _retire(self, req: Request, counter: str) -> None:
        if req.finished and self._requests.pop(req.request_id, None) is not None:
            s0 = req.sequences[0]
            self.recorder.add(**{counter: 1}, prompt_tokens_total=len(req.prompt_ids),
                              cached_prompt_tokens_total=s0.num_cached_tokens or 0)
