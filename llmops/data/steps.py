"""The dataset `prepare` steps: dedupe, filter, map and split, and `run_steps` that chains them.

Every step takes rows (dicts) and returns new rows plus a small stats dict for the profile.
`normalize_steps` checks a `prepare:` list and fills in defaults; its result is the canonical
form written to a dataset's spec.json (so a default that changes later changes the fingerprint).
`split` must be the last step; without one, every row goes to the train split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from llmops.data.io import canonical_json
from llmops.errors import LlmopsError

Row = dict[str, Any]

_ALLOWED: dict[str, dict[str, Any]] = {
    "dedupe": {"fields": None, "near_duplicate_threshold": None, "num_perm": 64, "shingle_size": 3},
    "filter": {"min_chars": {}, "max_chars": {}, "required": [], "regex": {}},
    "map": {"rename": {}, "template": {}, "keep": None},
    "split": {"eval_fraction": 0.1, "seed": 0},
}


def _fail(where: str, problem: str) -> LlmopsError:
    return LlmopsError(f"{where}: {problem}; see docs/config-reference.md (datasets.NAME, steps).")


def _check_str_map(where: str, value: Any, of: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, of) for k, v in value.items()):
        raise _fail(where, f"must map field names to {what}")
    if of is int or of == (int,):
        if any(isinstance(v, bool) or v < 0 for v in value.values()):
            raise _fail(where, "lengths must be integers >= 0")


def _check_str_list(where: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, "must be a list of field names")


def _check_step(where: str, name: str, args: dict[str, Any]) -> None:
    if name == "dedupe":
        if args["fields"] is not None:
            _check_str_list(f"{where}.fields", args["fields"])
            if not args["fields"]:
                raise _fail(f"{where}.fields", "must name at least one field (omit it to use all fields)")
        t = args["near_duplicate_threshold"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
            raise _fail(f"{where}.near_duplicate_threshold", f"must be a number in (0, 1], found {t!r}")
        for key in ("num_perm", "shingle_size"):
            v = args[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
                raise _fail(f"{where}.{key}", f"must be an integer from 1 to 1024, found {v!r}")
    elif name == "filter":
        _check_str_map(f"{where}.min_chars", args["min_chars"], int, "integers")
        _check_str_map(f"{where}.max_chars", args["max_chars"], int, "integers")
        _check_str_list(f"{where}.required", args["required"])
        _check_str_map(f"{where}.regex", args["regex"], str, "regular expressions")
        for fld, pattern in args["regex"].items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise _fail(f"{where}.regex.{fld}", f"invalid regular expression {pattern!r} ({exc})") from None
    elif name == "map":
        _check_str_map(f"{where}.rename", args["rename"], str, "new names")
        _check_str_map(f"{where}.template", args["template"], str, "Jinja2 text")
        if args["keep"] is not None:
            _check_str_list(f"{where}.keep", args["keep"])
    elif name == "split":
        f = args["eval_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise _fail(f"{where}.eval_fraction", f"must be a number from 0 to 1, found {f!r}")
        if isinstance(args["seed"], bool) or not isinstance(args["seed"], int):
            raise _fail(f"{where}.seed", f"must be an integer, found {args['seed']!r}")


def normalize_steps(prepare: Any, where: str = "prepare") -> list[dict[str, dict[str, Any]]]:
    """Check a `prepare:` list and return it with every default filled in."""
    if prepare is None:
        return []
    if not isinstance(prepare, list):
        raise _fail(where, "must be a list of steps")
    out: list[dict[str, dict[str, Any]]] = []
    for i, step in enumerate(prepare):
        at = f"{where}[{i}]"
        if not isinstance(step, dict) or len(step) != 1:
            raise _fail(at, "each step is an object with exactly one key (dedupe, filter, map or split)")
        (name, args), = step.items()
        if name not in _ALLOWED:
            raise _fail(at, f"unknown step {name!r}; use dedupe, filter, map or split")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise _fail(f"{at}.{name}", "must be an object")
        unknown = sorted(set(args) - set(_ALLOWED[name]))
        if unknown:
            raise _fail(f"{at}.{name}", f"unknown key(s) {', '.join(unknown)}")
        full = {k: args.get(k, default) for k, default in _ALLOWED[name].items()}
        _check_step(f"{at}.{name}", name, full)
        if name == "split" and i != len(prepare) - 1:
            raise _fail(at, "`split` must be the last step")
        out.append({name: full})
    return out


def _content(row: Row) -> Row:
    """A row without its bookkeeping fields (`_source`: which file of `sources:` it came from),
    so the same record from two files is a duplicate."""
    return {k: v for k, v in row.items() if not str(k).startswith("_")}


def _text(row: Row, fields: list[str]) -> str:
    return "\n".join("" if row.get(f) is None else str(row.get(f)) for f in fields)


def dedupe(
    rows: list[Row],
    fields: list[str] | None = None,
    near_duplicate_threshold: float | None = None,
    num_perm: int = 64,
    shingle_size: int = 3,
) -> tuple[list[Row], dict[str, int]]:
    """Drop exact duplicates on `fields` (all fields if None), then near duplicates; first one wins."""
    seen: set[str] = set()
    kept: list[Row] = []
    for row in rows:
        key = canonical_json({f: row.get(f) for f in fields} if fields is not None else _content(row))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    stats = {"removed_exact": len(rows) - len(kept), "removed_near": 0}
    if near_duplicate_threshold is not None and kept:
        from llmops.data.minhash import near_duplicates, signatures

        texts = [_text(r, fields if fields is not None else sorted(_content(r))) for r in kept]
        sig, valid = signatures(texts, num_perm=num_perm, shingle_size=shingle_size)
        drop = set(near_duplicates(sig, valid, float(near_duplicate_threshold)))
        kept = [r for i, r in enumerate(kept) if i not in drop]
        stats["removed_near"] = len(drop)
    return kept, stats


def _chars(value: Any) -> int:
    return 0 if value is None else len(value if isinstance(value, str) else str(value))


def filter_rows(
    rows: list[Row],
    min_chars: dict[str, int] | None = None,
    max_chars: dict[str, int] | None = None,
    required: list[str] | None = None,
    regex: dict[str, str] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Keep rows whose fields meet every rule; a missing field has length 0 and matches no regex."""
    checks: list[tuple[str, Callable[[Row], bool]]] = []
    for f, n in (min_chars or {}).items():
        checks.append((f"min_chars.{f}", lambda r, f=f, n=n: _chars(r.get(f)) >= n))
    for f, n in (max_chars or {}).items():
        checks.append((f"max_chars.{f}", lambda r, f=f, n=n: _chars(r.get(f)) <= n))
    for f in required or []:
        checks.append((f"required.{f}", lambda r, f=f: r.get(f) is not None and str(r.get(f)).strip() != ""))
    for f, pattern in (regex or {}).items():
        rx = re.compile(pattern)
        checks.append((f"regex.{f}", lambda r, f=f, rx=rx: r.get(f) is not None and rx.search(str(r.get(f))) is not None))
    kept: list[Row] = []
    removed_by: dict[str, int] = {}
    for row in rows:
        failed = next((name for name, check in checks if not check(row)), None)
        if failed is None:
            kept.append(row)
        else:
            removed_by[failed] = removed_by.get(failed, 0) + 1
    return kept, {"removed": len(rows) - len(kept), "removed_by": dict(sorted(removed_by.items()))}


def map_rows(
    rows: list[Row],
    rename: dict[str, str] | None = None,
    template: dict[str, str] | None = None,
    keep: list[str] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Rename fields, then render templated fields (sandboxed Jinja2, row as variables), then keep."""
    from jinja2 import TemplateError

    from llmops.templating.prompt_template import RenderBudgetError, bounded_env, render_bounded

    env = bounded_env()  # the prompts' sandbox and budgets: a dataset's template is PR content too
    compiled = {}
    for f, text in (template or {}).items():
        try:
            compiled[f] = env.from_string(text)
        except TemplateError as exc:
            raise LlmopsError(f"map.template.{f}: invalid Jinja2 template ({exc}); fix the template text.") from None
    out: list[Row] = []
    for i, row in enumerate(rows):
        new = {(rename or {}).get(k, k): v for k, v in row.items()}
        rendered = {}
        for f, tpl in compiled.items():
            try:
                rendered[f] = render_bounded(env, tpl, new)
            except (RenderBudgetError, OverflowError) as exc:  # OverflowError: the sandbox's range() cap
                raise LlmopsError(f"map.template.{f}: row {i + 1}: over the render budget ({exc}); a field "
                                  "template renders one row's text: drop the big loop or repetition.") from None
            except TemplateError as exc:
                raise LlmopsError(
                    f"map.template.{f}: row {i + 1} (after the previous steps): {exc}; "
                    "use only fields every row has, or add a `filter: {required: [...]}` step first."
                ) from None
        new.update(rendered)
        if keep is not None:
            new = {k: new[k] for k in keep if k in new}
        out.append(new)
    return out, {"fields": sorted({k for r in out for k in r})}


def split_score(row: Row, seed: int) -> float:
    """A number in [0, 1) fixed by the row's content and the seed (not by its position)."""
    digest = hashlib.sha256(f"{seed}\n{canonical_json(row)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(rows: list[Row], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Rows whose score is below `eval_fraction` go to eval, the rest to train; order is kept.

    When the fraction is strictly between 0 and 1 and there are at least two rows, neither
    split is left empty: the row with the lowest (or highest) score moves over. That choice
    depends only on the set of rows, so the split stays independent of input order.
    """
    scores = [split_score(r, seed) for r in rows]
    in_eval = [s < eval_fraction for s in scores]
    if 0 < eval_fraction < 1 and len(set(map(canonical_json, rows))) >= 2:
        if not any(in_eval):
            low = min(scores)
            in_eval = [s == low for s in scores]
        elif all(in_eval):
            high = max(scores)
            in_eval = [s != high for s in scores]
    train = [r for r, e in zip(rows, in_eval) if not e]
    evals = [r for r, e in zip(rows, in_eval) if e]
    return train, evals


@dataclass
class PrepareResult:
    """The prepared splits and one stats entry per step (for the profile)."""

    splits: dict[str, list[Row]]
    steps: list[dict[str, Any]] = field(default_factory=list)


def run_steps(rows: list[Row], steps: list[dict[str, dict[str, Any]]]) -> PrepareResult:
    """Run normalized steps in order (see `normalize_steps`)."""
    stats: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        (name, args), = step.items()
        entry: dict[str, Any] = {"step": name, "rows_in": len(rows)}
        if name == "split":
            train, evals = split_rows(rows, **args)
            entry["rows_out"] = {"train": len(train), "eval": len(evals)}
            stats.append(entry)
            return PrepareResult({"train": train, "eval": evals}, stats)
        fn = {"dedupe": dedupe, "filter": filter_rows, "map": map_rows}[name]
        try:
            rows, extra = fn(rows, **args)
        except LlmopsError as exc:
            raise LlmopsError(f"prepare[{i}].{exc.message}") from None
        entry["rows_out"] = len(rows)
        entry.update(extra)
        stats.append(entry)
    return PrepareResult({"train": rows}, stats)
