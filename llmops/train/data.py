"""Training data: prompt rendering, tokenization with loss masks, packing and batching.

An example is `(input_ids, labels)`: the rendered prompt's tokens are labelled -100 (no
loss), the response's tokens (plus EOS) are labelled with themselves, so the loss covers
the response only. Packing puts several examples into one row of at most
`max_seq_length` tokens (best fit, longest first); each example restarts its
`position_ids` at 0, which transformers turns into a block-diagonal causal mask, so
packed examples never attend to each other. torch is imported only by `collate`.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmops.errors import ProviderError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ProviderError(f"{path}:{n}: not valid JSON ({exc}); re-run the dataset's prepare.") from exc
    return rows


class PromptRenderer:
    """Renders a row into (prompt text, response text) with a Jinja2 template, in the
    sandbox and under the render budgets of llmops.templating (as evals and serving render).

    `prompt` is the job spec's prompt section: `text` (a Jinja2 template), or `chat`
    ({system, user} templates, put through the tokenizer's chat template when it has
    one), and `response_field` (default "answer").
    """

    def __init__(self, prompt: dict[str, Any], tokenizer: Any = None) -> None:
        import jinja2

        from llmops.templating.prompt_template import bounded_env

        self.env = bounded_env()
        self.response_field = prompt.get("response_field") or "answer"
        self.tokenizer = tokenizer
        self.chat = None
        try:
            if prompt.get("chat"):
                self.chat = {k: self.env.from_string(v) for k, v in prompt["chat"].items() if v}
            elif prompt.get("text") is not None:
                self.template = self.env.from_string(prompt["text"])
            else:
                raise ProviderError("the prompt has neither `text`, `template` nor `chat`; give one in llmops.yaml.")
        except jinja2.TemplateSyntaxError as exc:
            raise ProviderError(f"the prompt template does not parse (line {exc.lineno}: {exc.message}); "
                                "fix it (llmops validate shows where).") from None

    def render(self, row: dict[str, Any]) -> tuple[str, str]:
        import jinja2

        from llmops.templating.prompt_template import RenderBudgetError

        if self.response_field not in row:
            raise ProviderError(
                f"a dataset row has no field '{self.response_field}' (the prompt's response_field); "
                f"fields are {sorted(row)}: set prompts.*.response_field."
            )
        try:
            prompt = self._render_prompt(row)
        except jinja2.UndefinedError as exc:
            raise ProviderError(f"the prompt template uses a field the dataset lacks ({exc.message}); fix it.") from exc
        except RenderBudgetError as exc:
            raise ProviderError(f"the prompt is over the render budget ({exc}); prompts render small texts: "
                                "drop the big loop or repetition.") from None
        except jinja2.TemplateError as exc:
            raise ProviderError(f"the prompt template failed to render ({exc}); fix it.") from None
        return prompt, str(row[self.response_field])

    def _render_prompt(self, row: dict[str, Any]) -> str:
        from llmops.templating.prompt_template import messages_to_text, render_bounded

        if self.chat is None:
            text = render_bounded(self.env, self.template, row, seconds=None)
            # A template file ends with a newline; the response follows the prompt on that line.
            return text if text.endswith((" ", "\n")) else text + "\n"
        messages = [{"role": role, "content": render_bounded(self.env, t, row, seconds=None)}
                    for role, t in self.chat.items()]
        return messages_to_text(messages, self.tokenizer)


def encode_example(tokenizer: Any, prompt: str, response: str, max_len: int) -> Example:
    """Tokens of prompt + response + EOS, truncated to `max_len`; prompt tokens get no loss."""
    p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    bos = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p_ids = bos + p_ids
    r_ids = r_ids + eos
    ids = (p_ids + r_ids)[:max_len]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_len]
    # The first token of an example is never predicted (packed rows: never from the previous one).
    labels[0] = IGNORE
    return Example(ids, labels)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer prepends BOS to plain text by default, else []."""
    cached = getattr(tokenizer, "_llmops_bos_prefix", None)
    if cached is not None:
        return cached
    bos = tokenizer.bos_token_id
    ids = list(tokenizer("a")["input_ids"])
    prefix = [bos] if bos is not None and ids[:1] == [bos] else []
    try:
        tokenizer._llmops_bos_prefix = prefix
    except AttributeError:
        pass
    return prefix


def encode_rows(
    rows: Iterable[dict[str, Any]], renderer: PromptRenderer, tokenizer: Any, max_len: int
) -> list[Example]:
    """Examples of every row that has at least one response token after truncation."""
    out = []
    for row in rows:
        prompt, response = renderer.render(row)
        ex = encode_example(tokenizer, prompt, response, max_len)
        if any(label != IGNORE for label in ex.labels):
            out.append(ex)
    return out


def pack(examples: list[Example], max_len: int) -> list[list[Example]]:
    """Best-fit-decreasing bin packing of examples into rows of at most `max_len` tokens.

    Deterministic: ties keep the input order. Rows are returned in creation order.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for i in order:
        ex = examples[i]
        pos = bisect.bisect_left(free, (len(ex), -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(ex)
            space -= len(ex)
        else:
            b = len(bins)
            bins.append([ex])
            space = max_len - len(ex)
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


@dataclass
class Row:
    """One sequence of a batch: the concatenated tokens and each token's position."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def make_rows(examples: list[Example], max_len: int, packing: bool) -> list[Row]:
    """Rows to batch: one per example, or packed bins of several."""
    groups = pack(examples, max_len) if packing else [[ex] for ex in examples]
    rows = []
    for group in groups:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for ex in group:
            ids += ex.input_ids
            labels += ex.labels
            pos += list(range(len(ex)))
        rows.append(Row(ids, labels, pos))
    return rows


def epoch_batches(rows: list[Row], batch_size: int, seed: int, epoch: int) -> list[list[Row]]:
    """The rows of one epoch, shuffled by (seed, epoch), cut into batches."""
    order = list(range(len(rows)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [[rows[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def collate(batch: list[Row], pad_id: int, packed: bool, pad_to: int | None = None) -> dict[str, Any]:
    """Tensors of a batch, right-padded to its longest row (or `pad_to`).

    Packed batches carry `position_ids` and no attention mask (the mask comes from the
    positions); padding continues the positions as one more dummy sequence with no loss.
    Unpacked batches carry an attention mask.
    """
    import torch

    width = pad_to or max(len(r.input_ids) for r in batch)
    ids, labels, pos, mask = [], [], [], []
    for r in batch:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE] * n)
        pos.append(r.position_ids + list(range(n)))
        mask.append([1] * len(r.input_ids) + [0] * n)
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "n_tokens": sum(len(r.input_ids) for r in batch),
        "n_labels": sum(1 for r in batch for t in r.labels[1:] if t != IGNORE),
    }
    if packed:
        out["position_ids"] = torch.tensor(pos, dtype=torch.long)
    else:
        out["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    return out


def encode_pairs(rows: Iterable[dict[str, Any]], renderer: PromptRenderer, tokenizer: Any,
                 max_len: int) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples of preference rows: the prompt rendered from the row's
    variables like an SFT row, `chosen` and `rejected` the two answers (see
    `llmops feedback export --pairs`). Rows without both (say, the tickets a dataset's
    `sources:` joins to the pairs) and pairs where either side has no response token left
    after truncation are left out."""
    import jinja2

    out = []
    for n, row in enumerate(rows, 1):
        if not (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)):
            continue
        try:
            prompt = renderer._render_prompt(row)
        except jinja2.UndefinedError as exc:
            raise ProviderError(f"preference row {n}: the prompt template uses a field the row lacks "
                                f"({exc.message}); fix it.") from exc
        pair = (encode_example(tokenizer, prompt, row["chosen"], max_len),
                encode_example(tokenizer, prompt, row["rejected"], max_len))
        if all(any(label != IGNORE for label in ex.labels) for ex in pair):
            out.append(pair)
    return out


def pair_rows(pairs: list[tuple[Example, Example]]) -> list[tuple[Row, Row]]:
    """Unpacked rows of each pair (a pair's two sequences must be scored side by side)."""
    return [tuple(Row(ex.input_ids, ex.labels, list(range(len(ex)))) for ex in pair) for pair in pairs]  # type: ignore[misc]


def collate_pairs(batch: list[tuple[Row, Row]], pad_id: int) -> dict[str, Any]:
    """A batch of pairs as [chosen 1, rejected 1, chosen 2, ...], right-padded with a mask;
    `n_labels` counts pairs (the DPO loss is a mean over pairs)."""
    flat = [row for pair in batch for row in pair]
    out = collate(flat, pad_id, packed=False)
    out["n_labels"] = len(batch)
    return out
