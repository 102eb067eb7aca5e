"""Generation behind the HTTP layer: one loaded model, every model/tokenizer call under a lock.

`ModelService.generate` answers a parsed `GenerationRequest` with an `Outcome` (texts,
token counts, logprobs); `stream` yields its text as it is generated. It knows nothing of
HTTP: `llmops.serve.server` parses requests into it and writes its answers back, so another
transport (the ASGI server of the serving issue) can reuse it as is.
"""

from __future__ import annotations

import threading
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

    template: Any  # llmops.prompts.PromptTemplate
    variable: str | None
    info: dict[str, Any]

    @classmethod
    def load(cls, entry: dict[str, Any]) -> "ServedPrompt":
        """From the served file's `prompt` entry: {name, spec, root, version?}."""
        from llmops.prompts import load_prompt

        template = load_prompt(entry["spec"], entry["root"], str(entry.get("name") or ""))
        variable = template.variables[0] if len(template.variables) == 1 else None
        info = {"name": entry.get("name"), "version": entry.get("version"), "digest": template.digest(),
                "chat": f"the last user message is `{variable}`" if variable else
                        "messages as sent (the prompt declares more than one variable)"}
        return cls(template, variable, {k: v for k, v in info.items() if v is not None})


class ModelService:
    """The loaded model behind the HTTP layer; every model/tokenizer call holds `lock`."""

    def __init__(self, lm: Any, limits: RequestLimits | None = None, default_chat_max_tokens: int = 256,
                 prompt: ServedPrompt | None = None) -> None:
        self.lm = lm
        self.lock = threading.Lock()
        self.limits = limits or RequestLimits()
        self.default_chat_max_tokens = default_chat_max_tokens
        self.prompt = prompt

    def chat_inputs(self, req: GenerationRequest) -> dict[str, Any] | None:
        """The prompt variables a chat request fills ({variable: last user message}), or None
        when chats are not put through the deployment's prompt."""
        if req.kind != "chat" or self.prompt is None or self.prompt.variable is None:
            return None
        users = [m["content"] for m in req.messages if m["role"] == "user"]
        if not users:
            raise RequestError(400, "The chat has no user message; this model answers one: send "
                               "{\"role\": \"user\", \"content\": ...}.", "messages", "no_user_message")
        return {self.prompt.variable: users[-1]}

    def _prompt(self, req: GenerationRequest, text: str | None = None) -> tuple[str, bool]:
        """(prompt text, add_special_tokens) for a request. A chat goes through the deployment's
        prompt when it has one (as in training and evals), else the tokenizer's chat template."""
        from llmops.prompts import has_chat_template, messages_to_text

        if req.kind == "chat":
            inputs = self.chat_inputs(req)
            if inputs is not None and self.prompt is not None:
                from llmops.prompts import PromptError

                template = self.prompt.template
                try:
                    rendered = template.render(inputs, self.lm.tokenizer)
                except PromptError as exc:
                    raise RequestError(400, f"The message cannot be put through the prompt: {exc.message}",
                                       "messages", "invalid_prompt") from None
                return rendered, not (template.is_chat and has_chat_template(self.lm.tokenizer))
            return messages_to_text(req.messages, self.lm.tokenizer), not has_chat_template(self.lm.tokenizer)
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
        """Answer a non-streaming request (all prompts x n choices in one batch)."""
        from llmops.serve.model import generate_batch

        with self.lock:
            items = [self._prompt(req, p) for p in (req.prompts or [""])]
            budgets, prompt_ids = [], []
            for text, special in items:
                ids = self.lm.encode(text, special)
                prompt_ids.append(ids)
                budgets.append(self._budget(req, len(ids)))
            wanted = max(budgets)
            self._check_request_tokens(req, sum(len(ids) for ids in prompt_ids), len(items) * req.n, wanted)
            self._seed(req)
            outs = []
            if wanted > 0:
                batch = [text for text, _ in items for _ in range(req.n)]
                outs = generate_batch(self.lm, batch, max_new_tokens=wanted, temperature=req.temperature,
                                      top_p=req.top_p, add_special_tokens=items[0][1], stop=req.stop)
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
