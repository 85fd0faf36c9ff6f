"""Continuous batching over the paged KV cache, for serving many requests at once.

Each engine step runs at most one prefill chunk (new requests' prompts, ragged, chunked) and
one decode step for every running request, so a long prompt cannot stall running streams for
longer than one chunk. Requests join the decode batch as soon as their prompt is in the cache
and leave it when they finish; their pages are freed or kept as a reusable prefix.

Admission reserves each request's worst case (prompt + max_tokens pages) so a running
request never meets a full cache; requests that do not fit wait, and requests that could
never fit are refused at submission. Finished sequences stay in the cache as prefixes (LRU,
evicted when their pages are needed): a new prompt that shares a prefix forks it and
prefills only the rest.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable

from qwen3c.errors import Qwen3cError, RequestError, WorkerError
from qwen3c.runtime.model import Model
from qwen3c.runtime.sampling import SamplingParams
from qwen3c.runtime.sequence import SequenceState, TokenLogprob

_request_ids = itertools.count()
RATE_WINDOW_S = 10.0  # the window of the tokens/s figure in /metrics
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RequestEvent:
    """What a request produced since its previous event (called from the engine thread)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # set on the last event: "stop", "length" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    on_event: Callable[[RequestEvent], None]
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: int | None = None
    request_id: int = dataclasses.field(default_factory=lambda: next(_request_ids))
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None


@dataclasses.dataclass
class EngineCounters:
    """Cumulative figures for /metrics and for tests (prefix reuse is asserted on them)."""

    requests_finished: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed
    reused_prefix_tokens: int = 0  # prompt tokens taken from cached prefixes
    generated_tokens: int = 0


@dataclasses.dataclass
class _Running:
    request: Request
    seq: SequenceState
    reserved_pages: int
    shared_tokens: int = 0  # prefix forked from a cached sequence: its pages are not ours
    sent_text: int = 0
    sent_tokens: int = 0


class Engine:
    def __init__(self, model: Model, *, max_cached_prefixes: int = 16):
        self.model = model
        self.kv = model.kv_cache
        self.counters = EngineCounters()
        self.max_cached_prefixes = max_cached_prefixes
        self._incoming: collections.deque[Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Running] = []
        self._prefixes: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # set when the model's workers died: nothing runs
        self.total_pages = self.kv.free_pages()
        self._recent: collections.deque[float] = collections.deque()  # token timestamps

    # ---- control, from any thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qwen3c-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request, or raise ``RequestError`` if it can never be served (or
        ``WorkerError`` once the model has failed)."""
        if self.failure is not None:
            raise WorkerError(self.failure)
        self.model.checked_ids(request.prompt_ids)
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if self._pages_needed(request) > self.total_pages:
            raise RequestError(
                f"the request needs {self._pages_needed(request)} KV pages (prompt + "
                f"max_tokens), more than the cache's {self.total_pages}; lower max_tokens")
        with self._wake:
            self._incoming.append(request)
            self._wake.notify()

    def cancel(self, request_id: int) -> None:
        """Stop a request (e.g. its client went away) and free its pages."""
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    @property
    def pages_used(self) -> int:
        return self.total_pages - self.kv.free_pages()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        cutoff = time.perf_counter() - RATE_WINDOW_S
        return sum(1 for t in list(self._recent) if t >= cutoff) / RATE_WINDOW_S

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._incoming or self._waiting or self._running
                           or self._cancelled):
                    self._wake.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancelled, self._cancelled = self._cancelled, set()
            try:
                self._step(cancelled)
            except WorkerError as err:  # the model is gone: fail everything, refuse the rest
                self.failure = str(err)
                self._fail_all(self.failure)
                log.error("the model failed; the server can no longer generate: %s", err)
                break
            except Qwen3cError as err:  # fail the batch's requests, keep serving
                self._fail_all(str(err))
            except Exception as bug:  # a qwen3c bug: log it, but never leave clients hanging
                log.exception("engine step failed")
                self._fail_all(f"internal error: {bug}")
        self._fail_all("the server is shutting down")

    def _step(self, cancelled: set[int]) -> None:
        self._drop_cancelled(cancelled)
        self._admit()
        prefilling = [r for r in self._running if r.seq.prompt_left]
        if prefilling:
            before = sum(r.seq.prefilled for r in prefilling)
            by_seq = {id(r.seq): r for r in prefilling}
            for seq, logits in self.model.prefill_step([r.seq for r in prefilling]):
                self._accept(by_seq[id(seq)], logits[-1])
            self.counters.prefilled_tokens += sum(r.seq.prefilled for r in prefilling) - before
        decoding = [r for r in self._running if not r.seq.prompt_left and not r.seq.finished]
        if decoding:
            for running, row in zip(decoding, self.model.decode_step([r.seq for r in decoding]),
                                    strict=True):
                self._accept(running, row)
        self._retire_finished()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.kv.max_batch_size:
            request = self._waiting[0]
            if self._pages_needed(request) > self._free_unreserved_pages():
                if not self._evict_prefix():
                    break  # wait for running requests to finish
                continue
            self._waiting.popleft()
            seq = self._start_sequence(request)
            self._running.append(_Running(request, seq, self._pages_needed(request),
                                          shared_tokens=seq.prefilled))

    def _start_sequence(self, request: Request) -> SequenceState:
        """Fork the cached prefix that shares most with the prompt, or start empty."""
        prompt = request.prompt_ids
        best, shared = None, 0
        for seq_id, tokens in self._prefixes.items():
            common = _common_prefix(tokens, prompt, limit=len(prompt) - 1)
            if common > shared:
                best, shared = seq_id, common
        seq_id = self.kv.fork_sequence(best, shared) if best is not None else None
        if best is not None:
            self._prefixes.move_to_end(best)
        self.counters.prompt_tokens += len(prompt)
        self.counters.reused_prefix_tokens += shared
        seq = self.model.new_sequence(prompt, max_new_tokens=request.max_tokens,
                                      params=request.params, stop=request.stop,
                                      stop_token_ids=request.stop_token_ids,
                                      logprobs=request.logprobs, seq_id=seq_id)
        seq.prefilled = shared
        return seq

    def _accept(self, running: _Running, logits) -> None:
        running.seq.accept(logits)
        if running.request.first_token_at is None:
            running.request.first_token_at = time.perf_counter()
        self.counters.generated_tokens += 1
        now = time.perf_counter()
        self._recent.append(now)
        while self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        self._emit(running)

    def _emit(self, running: _Running, error: str | None = None) -> None:
        seq = running.seq
        end = seq.stable_text_end() if seq.text is not None else 0
        tokens = seq.generated[running.sent_tokens:]
        logprobs = seq.token_logprobs[running.sent_tokens:] if seq.logprobs is not None else []
        finish = "error" if error else seq.finish_reason
        if not (tokens or finish or end > running.sent_text):
            return
        running.request.on_event(RequestEvent(
            text=(seq.text or "")[running.sent_text:end], token_ids=tokens, logprobs=logprobs,
            finish_reason=finish, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated), error=error))
        running.sent_text, running.sent_tokens = end, len(seq.generated)

    def _retire_finished(self) -> None:
        for running in [r for r in self._running if r.seq.finished]:
            self._running.remove(running)
            self.counters.requests_finished += 1
            self._keep_as_prefix(running.seq)

    def _keep_as_prefix(self, seq: SequenceState) -> None:
        length = self.kv.lengths[seq.seq_id]
        if length == 0 or self.max_cached_prefixes == 0:
            self.kv.remove_sequence(seq.seq_id)
            return
        self._prefixes[seq.seq_id] = (seq.prompt_ids + seq.generated)[:length]
        while len(self._prefixes) > self.max_cached_prefixes:
            self._evict_prefix()

    def _evict_prefix(self) -> bool:
        if not self._prefixes:
            return False
        seq_id, _ = self._prefixes.popitem(last=False)
        self.kv.remove_sequence(seq_id)
        return True

    def _drop_cancelled(self, cancelled: set[int]) -> None:
        if not cancelled:
            return
        self._waiting = collections.deque(r for r in self._waiting
                                          if r.request_id not in cancelled)
        for running in [r for r in self._running if r.request.request_id in cancelled]:
            self._running.remove(running)
            self.kv.remove_sequence(running.seq.seq_id)

    def _fail_all(self, message: str) -> None:
        for running in self._running:
            self._emit(running, error=message)
            with contextlib.suppress(WorkerError):  # a dead model has no cache to clean
                self.kv.remove_sequence(running.seq.seq_id)
        self._running = []
        for request in [*self._waiting, *self._incoming]:
            request.on_event(RequestEvent("", [], [], "error", len(request.prompt_ids), 0,
                                          message))
        self._waiting.clear()
        self._incoming.clear()

    # ---- page accounting --------------------------------------------------------------------

    def _pages_needed(self, request: Request) -> int:
        return self.kv.pages_for(len(request.prompt_ids) + request.max_tokens) + 1

    def _free_unreserved_pages(self) -> int:
        """Free pages minus what running requests may still claim: each holds at most the
        pages past its shared prefix, plus the page copied when it was forked."""
        def held(r: _Running) -> int:
            return (self.kv.pages_for(self.kv.lengths[r.seq.seq_id])
                    - self.kv.pages_for(r.shared_tokens) + 1)

        outstanding = sum(max(0, r.reserved_pages - held(r)) for r in self._running)
        return self.kv.free_pages() - outstanding


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
