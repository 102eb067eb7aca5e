"""Continuous batching of greedy requests over one paged KV cache (transformers' manager).

`ContinuousEngine` runs transformers' `ContinuousBatchingManager` (the model's
`init_continuous_batching`): one background thread decodes every running sequence together,
one token per step, and a request that arrives while others decode joins at the next step
instead of waiting for them to finish; a finished sequence leaves at once and its cache
blocks are reused. The cache is paged and sized once (`CacheSize`), so memory is bounded by
the configuration, not by traffic.

The manager samples with one setting for all its requests, so this engine is greedy only
(temperature 0): the server's sampled requests keep the wave batching of
`llmops.serve.service.Batcher`. Greedy answers are token for token those of a plain
`generate` (tests/test_serve_engine.py). Stop strings are matched here on the streamed
tokens, and a request is cancelled in the manager as soon as its text holds one.

Outputs come back on the manager's one output queue; a dispatcher thread of ours hands
each to its request, so requests never take each other's results.
"""

from __future__ import annotations

import atexit
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

PAGE_SIZE = 16  # tokens per cache block
_LIVE: "weakref.WeakSet[ContinuousEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Engines still open at exit are stopped first: a generation thread killed in the middle
    of a step at interpreter shutdown aborts the process."""
    for engine in list(_LIVE):
        engine.close()


@dataclass(frozen=True)
class CacheSize:
    """The paged cache: room for `max_batch` sequences of `max_positions` tokens each."""

    max_batch: int
    max_positions: int

    @property
    def blocks(self) -> int:
        return self.max_batch * math.ceil(self.max_positions / PAGE_SIZE)


@dataclass
class _Request:
    ids: list[int]
    stop: list[str]
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)


class EngineError(RuntimeError):
    pass


class ContinuousEngine:
    """Greedy generation for many requests at once; `generate` blocks its caller only.

    `largest` (most sequences in the engine at once: decoding, or queued by the manager
    for a free slot of its `max_batch`) and `busy_periods` (times the engine went
    from idle to busy) are kept for tests and benchmarks."""

    def __init__(self, lm: Any, max_batch: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.lm = lm
        self.size = CacheSize(max_batch, lm.max_positions)
        tok = lm.tokenizer
        config = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=-1,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=self.size.blocks,
                                      max_batch_tokens=max(256, min(lm.max_positions, 2048)),
                                      max_requests_per_batch=max_batch)
        self._manager = lm.model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        self._eos = sorted(lm.eos_ids | ({tok.pad_token_id} if tok.pad_token_id is not None else set()))
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self.running = 0
        self.largest = 0
        self.busy_periods = 0
        # The manager's generation thread inherits daemon status from the thread that starts
        # it: started from a daemon thread, it never keeps a finished process alive.
        starter = threading.Thread(target=self._manager.start, name="llmops-engine-start", daemon=True)
        starter.start()
        starter.join()
        _LIVE.add(self)
        self._dispatcher = threading.Thread(target=self._dispatch, name="llmops-engine-out", daemon=True)
        self._closed = threading.Event()
        self._dispatcher.start()

    # -- requests ------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                 timeout: float | None = None) -> list[list[int]]:
        """The generated token ids of each prompt (greedy; cut where a stop string appeared,
        the caller trims the text). Raises EngineError on a failure or after `timeout`."""
        stop = [s for s in stop if s]
        rids = [self._add(list(ids), max_new_tokens, stop) for ids in prompt_ids]
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [self._collect(rid, deadline) for rid in rids]
        finally:
            for rid in rids:
                self._forget(rid, cancel=True)

    def _add(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> str:
        with self._lock:
            self._counter += 1
            rid = f"llmops-{self._counter}"
            self._requests[rid] = _Request(ids, stop)
            if self.running == 0:
                self.busy_periods += 1
            self.running += 1
            self.largest = max(self.largest, self.running)
        got = self._manager.add_request(ids, request_id=rid, max_new_tokens=max_new_tokens,
                                        streaming=bool(stop), eos_token_id=self._eos)
        if got is None:
            self._forget(rid, cancel=False)
            raise EngineError("the generation engine is not accepting requests (stopped or failed)")
        return rid

    def _collect(self, rid: str, deadline: float | None) -> list[int]:
        req = self._requests[rid]
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise EngineError("timed out waiting for the generation engine")
            try:
                out = req.out.get(timeout=left)
            except queue.Empty:
                raise EngineError("timed out waiting for the generation engine") from None
            if isinstance(out, BaseException):
                raise EngineError(str(out))
            if getattr(out, "error", None):
                raise EngineError(str(out.error))
            tokens = list(out.generated_tokens)
            if out.is_finished():
                return tokens
            if req.stop and self._stopped(tokens, req.stop):
                return tokens  # the rest is cancelled in `_forget`

    def _stopped(self, tokens: list[int], stop: list[str]) -> bool:
        from llmops.serve.model import cut_at_stop

        ends = set(self._eos)
        kept = next((tokens[:k] for k, t in enumerate(tokens) if t in ends), tokens)
        return cut_at_stop(self.lm.tokenizer.decode(kept, skip_special_tokens=True), stop)[1]

    def _forget(self, rid: str, cancel: bool) -> None:
        with self._lock:
            req = self._requests.pop(rid, None)
            if req is not None:
                self.running -= 1
        if req is not None and cancel:
            self._manager.cancel_request(rid)  # a no-op for a finished request

    # -- the output side -----------------------------------------------------------------
    def _dispatch(self) -> None:
        outputs = self._manager.output_router.output_queue
        while not self._closed.is_set():
            try:
                out = outputs.get(timeout=0.2)
            except queue.Empty:
                if not self._manager.is_running():
                    self._fail_all(EngineError("the generation engine stopped"))
                continue
            with self._lock:
                req = self._requests.get(out.request_id)
            if req is not None:
                req.out.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            waiting = list(self._requests.values())
        for req in waiting:
            req.out.put(exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        _LIVE.discard(self)
        self._manager.stop(block=True, timeout=10)
        self._fail_all(EngineError("the generation engine was closed"))
