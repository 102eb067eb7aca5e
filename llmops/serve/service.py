"""Generation behind the HTTP layer: one loaded model, every model/tokenizer call under a lock.

`ModelService.generate` answers a parsed `GenerationRequest` with an `Outcome` (texts,
token counts, logprobs); `stream` yields its text as it is generated. It knows nothing of
HTTP: `llmops.serve.server` parses requests into it and writes its answers back, so another
transport (the ASGI server of the serving issue) can reuse it as is.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from llmops.serve.openai_api import GenerationRequest, RequestError, RequestLimits


@dataclass
class Outcome:
    """What one generation request produced, for the response and the request record."""

    texts: list[tuple[str, str]]  # (text, finish_reason) per choice
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any] | None] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # the texts the model saw (a chat: as rendered)
    inputs: dict[str, Any] | None = None  # a chat through the deployment's prompt: its variables


@dataclass
class ServedPrompt:
    """The deployment's prompt (the one its model was trained and evaluated with), which chat
    requests go through: the last user message fills `variable`, the prompt's one declared
    variable, and the text is rendered exactly as training and evals render it.

    `info` (name, registered version, digest) is what `/health` and `/v1/models` report."""

    template: Any  # llmops.templating.prompt_template.PromptTemplate
    variable: str | None
    info: dict[str, Any]
    # (regex, variables in the order they appear) matching this template's renderings, or
    # None when its text cannot be read back (see `parse`).
    pattern: tuple[Any, list[str]] | None = None

    def parse(self, text: str) -> dict[str, Any] | None:
        """The variables a completion prompt rendered from this template was given, or None
        when the text is not one of its renderings (or the template is not a plain text form
        whose variables each appear once)."""
        if self.pattern is None:
            return None
        found = self.pattern[0].fullmatch(text)
        return {v: found.group(f"v{i}") for i, v in enumerate(self.pattern[1])} if found else None

    @classmethod
    def load(cls, entry: dict[str, Any]) -> "ServedPrompt":
        """From the served file's `prompt` entry: {name, spec, root, version?}."""
        from llmops.templating.prompt_template import load_prompt

        template = load_prompt(entry["spec"], entry["root"], str(entry.get("name") or ""))
        variable = template.variables[0] if len(template.variables) == 1 else None
        info = {"name": entry.get("name"), "version": entry.get("version"), "digest": template.digest(),
                "chat": f"the last user message is `{variable}`" if variable else
                        "messages as sent (the prompt declares more than one variable)"}
        return cls(template, variable, {k: v for k, v in info.items() if v is not None}, _read_back(template))


def _read_back(template: Any) -> tuple[Any, list[str]] | None:
    """A regex reading the variables back out of `template`'s renderings: the template
    rendered with a marker per variable, the literal text between markers escaped."""
    import re

    if template.is_chat or not template.variables:
        return None
    marks = {v: f"\x00{i}\x00" for i, v in enumerate(template.variables)}
    try:
        shape = template.render(marks)
    except Exception:  # noqa: BLE001 - a template that branches on its variables
        return None
    if any(shape.count(mark) != 1 for mark in marks.values()):
        return None
    order = sorted(marks, key=lambda v: shape.index(marks[v]))
    pieces, rest = [], shape
    for v in order:
        head, rest = rest.split(marks[v], 1)
        pieces.append(re.escape(head))
    regex = "".join(f"{p}(?P<v{i}>.*?)" for i, p in enumerate(pieces)) + re.escape(rest) + r"\s*"
    return re.compile(regex, re.DOTALL), order


MAX_BATCH = 8  # sequences generated together: measured 4.7x the requests/s of one at a time on CPU
MAX_QUEUE = 64  # requests waiting for a batch; more get 503 at once
QUEUE_TIMEOUT_S = 60.0  # a request waiting longer for its batch gets 503
GATHER_S = 0.003  # how long a request that finds the model idle waits for others sent with it
BUSY_S = 0.05  # a shared batch that ended this recently means its clients are about to send again


@dataclass
class _Job:
    """One request's share of a batch: its prompts (x n), the settings it must share with the
    others of its batch (`key`), and where its answer goes."""

    key: tuple
    texts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Any] | None = None
    error: BaseException | None = None
    abandoned: bool = False


class Batcher:
    """Batching of concurrent requests. Greedy ones (temperature 0) go to the continuous
    batching `engine` when there is one (`llmops.serve.engine`): they join the sequences being
    decoded at the next step; at most `max_batch` decode at once, and `max_queue` more wait.

    Sampled requests (and all of them without an engine) batch in waves: while one batch generates, arriving requests
    queue; the next batch takes the oldest request and every queued one whose decoding settings
    match it (temperature, top_p, stop strings, max new tokens), up to `max_batch` sequences,
    and generates them in one left-padded `generate` call. Requests never wait for company:
    an idle server answers one at once. The queue is bounded (`max_queue`: beyond it, 503 at
    once) and so is the wait (`timeout`: 503, and the request is dropped from its batch)."""

    def __init__(self, service: "ModelService", max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 timeout: float = QUEUE_TIMEOUT_S, engine: Any = None) -> None:
        self.service = service
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.queue: list[_Job] = []
        self.cond = threading.Condition()
        self.arriving = 0  # requests being prepared that will join the queue
        self.last_size, self.last_end = 0, 0.0  # the last batch's sequences and when it ended
        self.waves = 0  # sampled batches generated (for tests and benchmarks)
        self.wave_largest = 0
        self.engine = engine  # greedy requests: continuous batching (llmops.serve.engine)
        self.in_engine = 0  # requests in it now
        threading.Thread(target=self._work, name="llmops-batcher", daemon=True).start()

    @property
    def batches(self) -> int:
        """Batches generated: sampled waves, plus the engine's busy periods (requests that
        decoded beside each other count once)."""
        return self.waves + (self.engine.busy_periods if self.engine is not None else 0)

    @property
    def largest(self) -> int:
        """Most sequences generated together."""
        return max(self.wave_largest, self.engine.largest if self.engine is not None else 0)

    @contextlib.contextmanager
    def arrival(self):
        """Held while a request is prepared for `run`: a batch being formed waits for it until
        it is queued (or fails)."""
        token = {"queued": False}
        with self.cond:
            self.arriving += 1
        try:
            yield token
        finally:
            with self.cond:
                if not token["queued"]:
                    self.arriving -= 1
                    self.cond.notify_all()

    def run(self, key: tuple, texts: list[str], arrival: dict[str, bool] | None = None) -> list[Any]:
        job = _Job(key, texts)
        with self.cond:
            if arrival is not None and not arrival["queued"]:
                arrival["queued"] = True
                self.arriving -= 1
            greedy = self.engine is not None and key[0] == 0
            # the engine decodes `max_batch` requests' sequences at once; the rest wait in it
            waiting = max(self.in_engine - self.max_batch, 0) if greedy else len(self.queue)
            if waiting >= self.max_queue:
                raise RequestError(503, f"The server is busy: {waiting} requests are waiting for the model. "
                                   "Retry in a moment.", None, "server_busy", type_="server_error",
                                   headers={"Retry-After": "1"})
            if greedy:
                self.in_engine += 1
            else:
                self.queue.append(job)
                self.cond.notify()
        if not greedy:
            return self._wait(job)
        try:
            return self._continuous(key, texts)
        finally:
            with self.cond:
                self.in_engine -= 1

    def _continuous(self, key: tuple, texts: list[str]) -> list[Any]:
        """Greedy requests decode in the continuous-batching engine, joining at the next step."""
        from llmops.serve.engine import EngineError
        from llmops.serve.model import finish_generated

        _, _, stop, special, wanted = key
        service = self.service
        with service._tok_lock:
            prompt_ids = [service._encode(t, special) for t in texts]
        try:
            outs = self.engine.generate(prompt_ids, wanted, stop, timeout=self.timeout)
        except EngineError as exc:
            if "timed out" not in str(exc):
                raise
            raise RequestError(503, f"The request waited {self.timeout:g} s for the model and was dropped; the "
                               "server is overloaded. Retry later.", None, "queue_timeout", type_="server_error",
                               headers={"Retry-After": "5"}) from None
        with service._tok_lock:
            return [finish_generated(service.lm, tokens, len(ids), list(stop)) for ids, tokens in zip(prompt_ids, outs)]

    def _wait(self, job: _Job) -> list[Any]:
        if not job.done.wait(self.timeout):
            with self.cond:
                if job in self.queue:
                    self.queue.remove(job)
                job.abandoned = True
            if not job.done.is_set():
                raise RequestError(503, f"The request waited {self.timeout:g} s for the model and was dropped; the "
                                   "server is overloaded. Retry later.", None, "queue_timeout", type_="server_error",
                                   headers={"Retry-After": "5"})
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _take(self) -> list[_Job]:
        """The next batch: the oldest job and the queued jobs sharing its key, in arrival order.
        A job that finds the model idle waits at most `GATHER_S` for others when some are being
        prepared (rendered and counted) at that moment, or when the last batch was shared and
        ended just now (its clients are sending their next requests): requests sent together
        run together. A lone client's request runs at once."""
        with self.cond:
            while not self.queue:
                self.cond.wait()
            busy = self.last_size > 1 and time.monotonic() - self.last_end < BUSY_S
            if (self.arriving or busy) and sum(len(j.texts) for j in self.queue) < self.max_batch:
                self.cond.wait_for(lambda: sum(len(j.texts) for j in self.queue) >= self.max_batch
                                   or not (self.arriving or busy), GATHER_S)
            head = self.queue[0]
            batch, size = [], 0
            for job in list(self.queue):
                if job.key == head.key and (not batch or size + len(job.texts) <= self.max_batch):
                    batch.append(job)
                    size += len(job.texts)
                    self.queue.remove(job)
            return batch

    def _work(self) -> None:
        from llmops.serve.model import generate_batch

        while True:
            batch = [j for j in self._take() if not j.abandoned]
            if not batch:
                continue
            temperature, top_p, stop, special, wanted = batch[0].key
            texts = [t for j in batch for t in j.texts]
            try:
                with self.service.lock:
                    outs = generate_batch(self.service.lm, texts, max_new_tokens=wanted, temperature=temperature,
                                          top_p=top_p, add_special_tokens=special, stop=list(stop))
            except BaseException as exc:  # noqa: BLE001 - every waiting request gets the failure
                for j in batch:
                    j.error = exc
                    j.done.set()
                continue
            self.waves += 1
            self.wave_largest = max(self.wave_largest, len(texts))
            self.last_size, self.last_end = len(texts), time.monotonic()
            at = 0
            for j in batch:
                j.result, at = outs[at : at + len(j.texts)], at + len(j.texts)
                j.done.set()


def _start_engine(lm: Any, max_batch: int) -> Any:
    """The continuous-batching engine for greedy requests, or None where the model cannot run
    on transformers' paged cache (its sampled and greedy requests then batch in waves)."""
    import logging

    from llmops.serve.engine import ContinuousEngine

    try:
        return ContinuousEngine(lm, max_batch)
    except Exception as exc:  # noqa: BLE001 - e.g. an architecture without paged attention
        logging.getLogger("llmops.serve").warning("continuous batching is off (%s: %s); batching in waves",
                                                  type(exc).__name__, exc)
        return None


class ModelService:
    """The loaded model behind the HTTP layer; every model/tokenizer call holds `lock`.

    With `batching` (the server's default), concurrent non-streaming requests are generated
    together (`Batcher`); a request with a `seed`, `logprobs` or `echo` runs on its own, so
    its answer does not depend on what else arrived."""

    def __init__(self, lm: Any, limits: RequestLimits | None = None, default_chat_max_tokens: int = 256,
                 prompt: ServedPrompt | None = None, batching: bool = False, max_batch: int = MAX_BATCH,
                 max_queue: int = MAX_QUEUE, queue_timeout: float = QUEUE_TIMEOUT_S, continuous: bool = True) -> None:
        self.lm = lm
        self.lock = threading.Lock()  # the model (and its tokenizer, which generation pads with)
        # Requests are rendered and counted with a copy of the tokenizer under a lock of their
        # own, so a request being prepared never waits for a batch that is generating: it is
        # queued in time to join the next one.
        self._tok = copy.deepcopy(lm.tokenizer) if batching else lm.tokenizer
        self._tok_lock = threading.Lock() if batching else self.lock
        self.limits = limits or RequestLimits()
        self.default_chat_max_tokens = default_chat_max_tokens
        self.prompt = prompt
        self.batcher = None
        if batching and max_batch > 1:
            engine = _start_engine(lm, max_batch) if continuous else None
            self.batcher = Batcher(self, max_batch, max_queue, queue_timeout, engine)

    def close(self) -> None:
        """Stop the continuous-batching engine's threads (requests still in it fail)."""
        if self.batcher is not None and self.batcher.engine is not None:
            self.batcher.engine.close()
            self.batcher.engine = None

    def chat_inputs(self, req: GenerationRequest) -> dict[str, Any] | None:
        """The prompt variables of a request: a chat's ({variable: last user message}) when
        chats go through the deployment's prompt; a single completion prompt's when it is a
        rendering of that prompt (recovered from the text); else None."""
        if req.kind == "completion":
            if self.prompt is None or len(req.prompts) != 1:
                return None
            return self.prompt.parse(req.prompts[0])
        if self.prompt is None or self.prompt.variable is None:
            return None
        users = [m["content"] for m in req.messages if m["role"] == "user"]
        if not users:
            raise RequestError(400, "The chat has no user message; this model answers one: send "
                               "{\"role\": \"user\", \"content\": ...}.", "messages", "no_user_message")
        return {self.prompt.variable: users[-1]}

    def _prompt(self, req: GenerationRequest, text: str | None = None) -> tuple[str, bool]:
        """(prompt text, add_special_tokens) for a request. A chat goes through the deployment's
        prompt when it has one (as in training and evals), else the tokenizer's chat template."""
        from llmops.templating.prompt_template import has_chat_template, messages_to_text

        if req.kind == "chat":
            inputs = self.chat_inputs(req)
            if inputs is not None and self.prompt is not None:
                from llmops.templating.prompt_template import PromptError

                template = self.prompt.template
                try:
                    rendered = template.render(inputs, self._tok)
                except PromptError as exc:
                    raise RequestError(400, f"The message cannot be put through the prompt: {exc.message}",
                                       "messages", "invalid_prompt") from None
                return rendered, not (template.is_chat and has_chat_template(self._tok))
            return messages_to_text(req.messages, self._tok), not has_chat_template(self._tok)
        return text or "", True

    def _budget(self, req: GenerationRequest, prompt_tokens: int) -> int:
        context = self.lm.max_positions
        wanted = req.max_tokens
        if wanted is None:  # as much as fits, up to the default, but at least one token
            wanted = max(min(self.default_chat_max_tokens, context - prompt_tokens), 1)
        if prompt_tokens + wanted > context:
            param = "messages" if req.kind == "chat" else "max_tokens"
            raise RequestError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt; {wanted} for the completion). "
                "Please reduce the prompt or the completion length.",
                param, "context_length_exceeded",
            )
        return wanted

    def _check_request_tokens(self, req: GenerationRequest, prompt_tokens: int, choices: int, wanted: int) -> None:
        """The parser bounded choices x max_tokens; with the prompts tokenized, bound the whole request."""
        total, limit = prompt_tokens + choices * wanted, self.limits.max_request_tokens
        if total <= limit:
            return
        param = "max_tokens" if choices * wanted > limit else ("messages" if req.kind == "chat" else "prompt")
        raise RequestError(
            400,
            f"This request asks for {total} tokens ({prompt_tokens} in the prompts; {choices} completions x {wanted} "
            f"tokens); this server allows {limit} tokens per request. Send shorter or fewer prompts, a smaller n or "
            "a smaller max_tokens.",
            param, "request_tokens_exceeded",
        )

    def _seed(self, req: GenerationRequest) -> None:
        if req.seed is not None:
            import torch

            torch.manual_seed(req.seed)

    def generate(self, req: GenerationRequest) -> Outcome:
        """Answer a non-streaming request (all prompts x n choices in one batch, shared with
        other requests' when batching)."""
        alone = self.batcher is None or req.seed is not None or req.logprobs is not None or req.echo
        with contextlib.ExitStack() as stack:
            arrival = None
            if not alone:
                assert self.batcher is not None
                arrival = stack.enter_context(self.batcher.arrival())
            return self._generate(req, alone, arrival)

    def _generate(self, req: GenerationRequest, alone: bool, arrival: dict[str, bool] | None) -> Outcome:
        from llmops.serve.model import generate_batch

        with self.lock if alone else self._tok_lock:
            items = [self._prompt(req, p) for p in (req.prompts or [""])]
            budgets, prompt_ids = [], []
            for text, special in items:
                ids = self._encode(text, special)
                prompt_ids.append(ids)
                budgets.append(self._budget(req, len(ids)))
            wanted = max(budgets)
            self._check_request_tokens(req, sum(len(ids) for ids in prompt_ids), len(items) * req.n, wanted)
            batch = [text for text, _ in items for _ in range(req.n)]
            outs = []
            if alone and wanted > 0:
                self._seed(req)
                outs = generate_batch(self.lm, batch, max_new_tokens=wanted, temperature=req.temperature,
                                      top_p=req.top_p, add_special_tokens=items[0][1], stop=req.stop)
        if not alone and wanted > 0:
            assert self.batcher is not None
            key = (req.temperature, req.top_p, tuple(req.stop), items[0][1], wanted)
            outs = self.batcher.run(key, batch, arrival)
        with contextlib.nullcontext() if req.logprobs is None else self.lock:
            texts, logprobs, completion = [], [], 0
            for k in range(len(items) * req.n):
                p = k // req.n
                if outs:
                    g = outs[k]
                    text, reason, kept = g.text, g.finish_reason, g.completion_tokens
                else:
                    text, reason, kept = "", "length", 0
                completion += kept
                if req.echo:
                    text = items[p][0] + text
                texts.append((text, reason))
                if req.logprobs is not None:
                    logprobs.append(self._logprobs(req, items[p][0], prompt_ids[p], outs[k].text if outs else ""))
            prompt_total = sum(len(ids) for ids in prompt_ids)  # counted once, whatever n is
        return Outcome(texts, prompt_total, completion, logprobs, [text for text, _ in items], self.chat_inputs(req))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _logprobs(self, req: GenerationRequest, prompt: str, prompt_ids: list[int], completion: str) -> dict[str, Any]:
        """OpenAI `logprobs` of the returned text; `text_offset` counts from its start."""
        from llmops.serve.model import token_logprobs

        tok = self.lm.tokenizer
        comp_ids = self.lm.encode(completion, add_special_tokens=False)
        values, tops = token_logprobs(self.lm, prompt_ids + comp_ids, req.logprobs or 0)
        pieces = [tok.decode([i]) for i in prompt_ids + comp_ids]
        offsets = []
        if req.echo:
            spans = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
            offsets = [int(s[0]) for s in spans][: len(prompt_ids)]
            offsets += [0] * (len(prompt_ids) - len(offsets))
        pos = len(prompt) if req.echo else 0
        for piece in pieces[len(prompt_ids):]:
            offsets.append(pos)
            pos += len(piece)
        first = 0 if req.echo else len(prompt_ids)
        return {
            "tokens": pieces[first:],
            "token_logprobs": values[first:],
            "top_logprobs": tops[first:] if req.logprobs else None,
            "text_offset": offsets[first:] if req.echo else offsets,
        }

    def stream(self, req: GenerationRequest, outcome: Outcome) -> Iterator[str]:
        """Text deltas of a streaming request; fills `outcome` when done. Holds the lock throughout."""
        from llmops.serve.model import TokenStream

        with self.lock:
            text, special = self._prompt(req, req.prompts[0] if req.prompts else None)
            prompt_tokens = len(self.lm.encode(text, special))
            budget = self._budget(req, prompt_tokens)
            self._check_request_tokens(req, prompt_tokens, 1, budget)
            self._seed(req)
            stream = TokenStream(self.lm, text, max_new_tokens=budget, temperature=req.temperature,
                                 top_p=req.top_p, add_special_tokens=special, stop=req.stop)
            yield from stream
            assert stream.result is not None
            outcome.texts = [(stream.result.text, stream.result.finish_reason)]
            outcome.prompts, outcome.inputs = [text], self.chat_inputs(req)
            outcome.prompt_tokens = prompt_tokens
            outcome.completion_tokens = stream.result.completion_tokens
