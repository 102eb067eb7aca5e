"""Prompt templates: loading, strict rendering, validate-time checks and content digests.

A prompt (`prompts.NAME` in llmops.yaml) is one Jinja2 template — a project file
(`template:`), inline text (`text:`) or a chat pair (`chat: {system, user}`) — rendered in a
sandboxed environment with `StrictUndefined`. The declared `variables` are the contract:
a template that uses an undeclared variable, or declares one it never uses, is a
validation error; rendering with a missing or an extra variable is an error that names the
template file and line. Chat prompts go through the tokenizer's chat template when it has
one (else the parts are joined with a blank line), so training, evaluation and serving all
see the same text.

Templates come from pull requests, so they are untrusted input:
- every file a prompt names (`template:`, `{% include %}`, `{% import %}`) resolves inside the
  project with symlinks resolved first; hidden files and folders (`.git/`, `.env`) are refused;
- a template may include only files under the folder of a declared template (its own
  `template:` folder, the folder of any prompt's `template:` that the caller passes as
  `template_dirs`, and `prompts/`), never from the project root itself;
- templates are UTF-8 and at most MAX_TEMPLATE_BYTES;
- rendering has a size budget (huge repetitions and filter widths are refused) and a loop
  budget (MAX_RENDER_ITERATIONS, all `{% for %}` loops of one render together) always, and a
  wall-clock budget when `llmops validate` renders the `examples:`;
- text shown in messages is cut to MAX_SHOWN_CHARS and never holds an environment value.

Nothing here imports torch or transformers: a tokenizer, when needed, is passed in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.loaders import split_template_path
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from llmops.errors import Diagnostic, LlmopsError
from llmops.redact import mask_env_values

FORMS = ("template", "text", "chat")
CHAT_ROLES = ("system", "user")

MAX_TEMPLATE_BYTES = 1_000_000
MAX_RENDER_CHARS = 1_000_000  # any rendered text or intermediate value
MAX_RENDER_ITERATIONS = 1_000_000  # `{% for %}` iterations in one render, all loops together
MAX_SHOWN_CHARS = 200  # rendered text quoted in a message
EXAMPLE_RENDER_SECONDS = 2.0  # wall clock for one `examples:` render at validate time
_DEFAULT_TEMPLATE_DIR = "prompts"


class PromptError(LlmopsError):
    """A prompt cannot be loaded or rendered; `file`/`line` say where (line 0: unknown)."""

    def __init__(self, summary: str, *, file: str = "", line: int = 0, path: str = "", hint: str = "") -> None:
        self.summary = summary
        self.file = file
        self.line = line
        self.path = path
        self.hint = hint
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        text = f"{where}{summary}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    def to_diagnostic(self) -> Diagnostic:
        return Diagnostic(summary=self.summary, path=self.path, file=self.file, line=self.line, hint=self.hint)


@dataclass(frozen=True)
class TemplateSource:
    """One Jinja2 source of a prompt.

    `label` is what messages name: a project-relative path for files, else
    `llmops.yaml prompts.NAME.text` (lines are then counted inside the inline text).
    `role` is `text` for single templates, `system`/`user` for chat parts.
    """

    role: str
    label: str
    source: str
    is_file: bool


class _ProjectLoader(jinja2.BaseLoader):
    """Loads inline sources by label and template files from allowed project folders.

    `files` are the prompt's own template files (always allowed); `dirs` the
    project-relative folders whose files may be included (see the module docstring).
    """

    def __init__(self, root: Path, inline: dict[str, str], files: Iterable[str] = (),
                 dirs: Iterable[str] = (), reads: set[str] | None = None) -> None:
        self.root = root
        self.inline = inline
        self.files = {_normal(f) for f in files}
        self.dirs = {_normal(d) for d in dirs if _normal(d)}
        self.reads = reads  # when given, collects every project file asked for (even refused ones)

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        if template in self.inline:
            return self.inline[template], template, lambda: True
        parts = split_template_path(template)  # refuses `..` and absolute escapes
        rel = "/".join(parts)
        if self.reads is not None:
            self.reads.add(rel)
        if rel not in self.files and not any(rel.startswith(d + "/") for d in self.dirs):
            allowed = ", ".join(sorted(d + "/" for d in self.dirs)) or "none"
            raise PromptError(
                f"template '{_shown(template, 80)}' is not under the folder of a declared template",
                file=rel, hint=f"templates may include only files under {allowed}; move it there")
        # The filename is the project-relative name so tracebacks and errors name it.
        return read_template_file(self.root, rel), rel, lambda: True


def _normal(rel: str) -> str:
    return "/".join(p for p in str(rel).replace("\\", "/").split("/") if p not in ("", "."))


def template_path(root: Path, rel: Any) -> Path:
    """The file a project-relative template path names, symlinks resolved; PromptError
    unless it is a regular file inside the project and no part of it is hidden."""
    if not isinstance(rel, str) or not rel.strip():
        raise PromptError("a template path must be a non-empty string", hint="name a file under prompts/")
    shown = _shown(rel, 80)
    if os.path.isabs(rel) or rel.startswith(("\\", "~")):
        raise PromptError(f"template path '{shown}' is absolute", file=shown,
                          hint="paths are relative to the project folder, e.g. prompts/main.j2")
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts) or "\0" in rel:
        raise PromptError(f"template path '{shown}' leaves the project or names a hidden file", file=shown,
                          hint="name a file inside the project, not under a hidden folder like .git/")
    base = root.resolve()
    try:
        real = (base / "/".join(parts)).resolve(strict=True)
    except (OSError, RuntimeError):
        raise PromptError(f"template file '{shown}' not found", file=shown,
                          hint="the path is relative to the project folder") from None
    if not real.is_relative_to(base) or any(p.startswith(".") for p in real.relative_to(base).parts):
        raise PromptError(f"template file '{shown}' resolves outside the project (a symlink?)", file=shown,
                          hint="templates must be files of the project; replace the symlink by the file")
    if not real.is_file():
        raise PromptError(f"template file '{shown}' not found (not a regular file)", file=shown,
                          hint="the path is relative to the project folder")
    return real


def template_stamp(root: Path, rel: str) -> str:
    """What a cached check of `rel` depends on: the sha256 of its bytes, or why it cannot be read."""
    try:
        with template_path(root, rel).open("rb") as fh:
            return hashlib.sha256(fh.read(MAX_TEMPLATE_BYTES + 1)).hexdigest()
    except PromptError as exc:
        return "refused: " + exc.summary
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def read_template_file(root: Path, rel: str) -> str:
    """A template file's text (see `template_path`); UTF-8, at most MAX_TEMPLATE_BYTES."""
    path = template_path(root, rel)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise PromptError(f"cannot read template file '{_shown(rel, 80)}' ({exc.strerror})", file=rel,
                          hint="check that the file is readable") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise PromptError(f"template file '{_shown(rel, 80)}' is larger than {MAX_TEMPLATE_BYTES:,} bytes", file=rel,
                          hint="a prompt template is text; keep data in datasets")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"template file '{_shown(rel, 80)}' is not UTF-8 text ({exc.reason} at byte {exc.start})", file=rel,
                          hint="save it as UTF-8") from None


class RenderBudgetError(Exception):
    """Rendering went past its size or time budget (turned into a PromptError)."""


class _CountingCodeGenerator(CodeGenerator):
    """Compiles every `{% for x in ITER %}` as `{% for x in environment.counted(ITER) %}`, and
    a recursive loop's `loop(ITER)` as `loop(environment.counted(ITER))`: each item any loop
    takes is counted."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter = _counted(node.iter)
        super().visit_For(node, frame)

    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        if isinstance(node.node, nodes.Name) and node.node.name == "loop" and node.args:
            node.args[0] = _counted(node.args[0])  # harmless where `loop` is not a recursive loop
        super().visit_Call(node, frame, forward_caller=forward_caller)


def _counted(expr: nodes.Expr) -> nodes.Expr:
    if isinstance(expr, nodes.Call) and isinstance(expr.node, nodes.EnvironmentAttribute) \
            and expr.node.name == "counted":
        return expr  # compiled before
    return nodes.Call(nodes.EnvironmentAttribute("counted"), [expr], [], None, None, lineno=expr.lineno)


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox plus budgets: refuses huge repetitions, widths and values, counts loop
    iterations and checks a deadline (set only while `examples:` render at validate time) on
    every call, against this thread's budgets (`set_budgets`). Immutable: a prompt has no
    use for `list.extend`, and `l.extend(l)` in a loop doubles without producing any output to
    check; `namespace()` attributes are checked when set.

    The loop budget stops a runaway loop as soon as it has run that many times, on any machine
    and in any thread (the wall clock's alarm works in the main thread only, and a loop that
    neither calls nor writes is seen by nothing else)."""

    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget = threading.local()  # one render's budgets per thread: a server renders in many

    def set_budgets(self, deadline: float | None, iterations: int | None) -> None:
        """This thread's budgets for the render it starts (None, None once it ends)."""
        self._budget.deadline = deadline
        self._budget.iterations_left = iterations

    def counted(self, iterable: Any) -> Any:
        budget = self._budget
        for item in iterable:
            left = getattr(budget, "iterations_left", None)
            if left is not None:
                if left <= 0:
                    raise RenderBudgetError(f"loops ran more than {MAX_RENDER_ITERATIONS:,} times")
                budget.iterations_left = left - 1
            yield item

    def check_deadline(self) -> None:
        deadline = getattr(self._budget, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise RenderBudgetError(f"rendering took longer than {EXAMPLE_RENDER_SECONDS:g} s")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.check_deadline()
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise RenderBudgetError(f"exponent {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise RenderBudgetError(f"repeating a value {n} times is over the {MAX_RENDER_CHARS:,} budget")
        if operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.check_deadline()
        _check_args(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format_widths(owner)  # `'{0:>999999999}'.format(1)` allocates before any size check
        return super().wrap_str_format(value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check_deadline()
        return super().getitem(obj, argument)


def _check_args(args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
            raise RenderBudgetError(f"argument {value} is over the {MAX_RENDER_CHARS:,} budget")


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_FORMAT_NUMBER = re.compile(r"\d+")


def _check_printf(fmt: str, values: Any) -> None:
    """`'%999999999d' % 1` would allocate its width before any size check: refuse it first."""
    for width, precision in _PRINTF_SPEC.findall(fmt):
        for number in (width, precision):
            if number.isdigit() and int(number) > MAX_RENDER_CHARS:
                raise RenderBudgetError(f"a format width of {int(number):,} is over the {MAX_RENDER_CHARS:,} budget")
    items = values if isinstance(values, tuple) else tuple(values.values()) if isinstance(values, dict) else (values,)
    _check_args(items, {})


def _check_format_widths(fmt: str) -> None:
    """The same for `'{0:>999999999}'.format(1)`: every number in a replacement field's spec."""
    import string

    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error
    for _, _, spec, _ in fields:
        for number in _FORMAT_NUMBER.findall(spec or ""):
            if int(number) > MAX_RENDER_CHARS:
                raise RenderBudgetError(f"a format width of {int(number):,} is over the {MAX_RENDER_CHARS:,} budget")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_RENDER_CHARS:
        raise RenderBudgetError(f"a value of {len(value):,} items is over the {MAX_RENDER_CHARS:,} budget")
    return value


def _budgeted_filter(env: _BudgetedSandbox, func: Any) -> Any:
    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        env.check_deadline()
        _check_args(args[1:], kwargs)
        if func.__name__ == "do_format" and args and isinstance(args[0], str):
            _check_printf(args[0], tuple(args[1:]))
        if func.__name__ == "do_indent" and args and isinstance(args[0], str):
            width = args[1] if len(args) > 1 else kwargs.get("width", 4)
            size = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            if (args[0].count("\n") + 1) * size > MAX_RENDER_CHARS:
                raise RenderBudgetError(f"indenting that many lines is over the {MAX_RENDER_CHARS:,} budget")
        return _sized(func(*args, **kwargs))

    return wrapper


class _BoundedNamespace(Namespace):
    """`namespace()` whose attributes are size-checked when set (`{% set ns.x = ns.x ~ ns.x %}`)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _sized(value))


def _make_env(loader: jinja2.BaseLoader) -> _BudgetedSandbox:
    env = _BudgetedSandbox(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,  # a template file's last newline is part of the prompt
        autoescape=False,
    )
    env.filters = {k: _budgeted_filter(env, f) for k, f in env.filters.items()}
    env.globals["namespace"] = _BoundedNamespace
    return env


def _render_budgeted(env: _BudgetedSandbox, template: jinja2.Template, variables: dict[str, Any],
                     seconds: float | None) -> str:
    """Render chunk by chunk, refusing past MAX_RENDER_CHARS or MAX_RENDER_ITERATIONS; with
    `seconds`, also past that wall clock (checked on every call and chunk, and by SIGALRM in
    the main thread)."""
    env.set_budgets(time.monotonic() + seconds if seconds else None, MAX_RENDER_ITERATIONS)
    use_alarm = bool(seconds) and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous: Any = None
    if use_alarm:
        def on_alarm(signum: int, frame: Any) -> None:
            raise RenderBudgetError(f"rendering took longer than {seconds:g} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, float(seconds) + 0.5)
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise RenderBudgetError(f"the rendered text is longer than {MAX_RENDER_CHARS:,} characters")
            env.check_deadline()
            out.append(chunk)
        return "".join(out)
    except MemoryError:
        raise RenderBudgetError("rendering ran out of memory") from None
    except RecursionError:
        raise RenderBudgetError("rendering recursed too deeply (a macro or include calling itself?)") from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        env.set_budgets(None, None)


def bounded_env() -> _BudgetedSandbox:
    """A sandbox with this module's render budgets and no template files, for other
    user-written templates (a dataset's `map.template`)."""
    return _make_env(jinja2.DictLoader({}))


def render_bounded(env: _BudgetedSandbox, template: jinja2.Template, variables: dict[str, Any],
                   seconds: float | None = EXAMPLE_RENDER_SECONDS) -> str:
    """Render `template` (from `bounded_env`) within the size budget and `seconds` of wall
    clock; RenderBudgetError past either."""
    return _render_budgeted(env, template, variables, seconds)


def _shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    text = mask_env_values(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PromptTemplate:
    """A loaded, compiled prompt; render it with `render(variables, tokenizer)`.

    Invariant: every source compiled without syntax errors; `variables` is the declared
    contract (order as in the config).
    """

    name: str
    form: str
    variables: tuple[str, ...]
    sources: list[TemplateSource]
    response_field: str
    env: _BudgetedSandbox = field(repr=False)

    @property
    def is_chat(self) -> bool:
        return self.form == "chat"

    def _template(self, src: TemplateSource) -> jinja2.Template:
        return self.env.get_template(src.label)

    def render_parts(self, variables: dict[str, Any], seconds: float | None = None) -> dict[str, str]:
        """Render each source with exactly the declared variables: {role: text}.

        `seconds`: a wall-clock budget for each source (validate-time checks pass one).
        """
        self._check_given(variables)
        out: dict[str, str] = {}
        for src in self.sources:
            try:
                out[src.role] = _render_budgeted(self.env, self._template(src), variables, seconds)
            except jinja2.TemplateError as exc:
                raise _render_error(self.name, src, exc) from None
            except RenderBudgetError as exc:
                raise PromptError(f"{_who(self.name)}: over the render budget ({_shown(src.label, 80)}): {exc}",
                                  file=src.label,
                                  path="" if src.is_file else _inline_path(self.name, src),
                                  hint="prompts render small texts; drop the big loop or repetition") from None
        return out

    def render(self, variables: dict[str, Any], tokenizer: Any = None, seconds: float | None = None) -> str:
        """The text the model sees, to which its answer is appended.

        A single template's text gets a newline appended unless it already ends in
        whitespace, so the answer starts on its own line (training does the same). Chat
        prompts use the tokenizer's chat template if it has one (see `messages_to_text`).
        """
        parts = self.render_parts(variables, seconds)
        if not self.is_chat:
            text = parts["text"]
            return text if text.endswith((" ", "\n", "\t")) else text + "\n"
        messages = [{"role": role, "content": parts[role]} for role in CHAT_ROLES if role in parts]
        return messages_to_text(messages, tokenizer)

    def _check_given(self, variables: dict[str, Any]) -> None:
        declared = set(self.variables)
        missing = [v for v in self.variables if v not in variables]
        extra = sorted(set(variables) - declared)
        if missing:
            var = missing[0]
            src, line = self._first_use(var)
            raise PromptError(
                f"{_who(self.name)}: variable '{var}' has no value",
                file=src.label if src else "",
                path="" if src is None or src.is_file else _inline_path(self.name, src),
                line=line,
                hint=f"pass all declared variables: {', '.join(self.variables)}",
            )
        if extra:
            raise PromptError(
                f"{_who(self.name)}: variable '{extra[0]}' is not declared in `variables`",
                file=self.sources[0].label,
                hint="declare it under `variables:` and use it in the template, or stop passing it",
            )

    def _first_use(self, var: str) -> tuple[TemplateSource | None, int]:
        for src in self.sources:
            line = _first_use_line(self._parse(src.label, src.source), var)
            if line:
                return src, line
        return (self.sources[0] if self.sources else None), 0

    def used_variables(self) -> dict[str, tuple[str, int]]:
        """Variables the templates (and what they include) read: {var: (label, first line)}."""
        used: dict[str, tuple[str, int]] = {}
        for label, source in self._all_sources():
            ast = self._parse(label, source)
            for var in sorted(meta.find_undeclared_variables(ast)):
                used.setdefault(var, (label, _first_use_line(ast, var)))
        return used

    def _all_sources(self) -> list[tuple[str, str]]:
        """The prompt's own sources, then every statically included template (once each)."""
        seen: dict[str, str] = {}
        queue = [(s.label, s.source) for s in self.sources]
        while queue:
            label, source = queue.pop(0)
            if label in seen:
                continue
            seen[label] = source
            for ref in meta.find_referenced_templates(self._parse(label, source)):
                if ref and ref not in seen:
                    try:
                        text, _, _ = self.env.loader.get_source(self.env, ref)  # type: ignore[union-attr]
                    except jinja2.TemplateNotFound:
                        raise PromptError(
                            f"{_who(self.name)}: included template '{ref}' not found",
                            file=label,
                            hint="paths in {% include %} are relative to the project folder",
                        ) from None
                    queue.append((ref, text))
        return list(seen.items())

    def _parse(self, label: str, source: str) -> nodes.Template:
        try:
            return self.env.parse(source, name=label, filename=label)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(
                f"{_who(self.name)}: template syntax error: {exc.message}", file=label, line=exc.lineno or 0
            ) from None

    def files(self) -> list[str]:
        """Project-relative files this prompt reads (its template and static includes)."""
        inline = {s.label for s in self.sources if not s.is_file}
        return sorted(label for label, _ in self._all_sources() if label not in inline)

    def digest(self) -> str:
        """Content version: changes when anything the model would see changes."""
        doc = {
            "form": self.form,
            "variables": sorted(self.variables),
            "response_field": self.response_field,
            "sources": [[s.role, s.source] for s in self.sources],
            "includes": {k: v for k, v in self._all_sources() if k not in {s.label for s in self.sources}},
        }
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` renders chats itself (its output then already holds special tokens)."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def messages_to_text(messages: list[dict[str, str]], tokenizer: Any = None) -> str:
    """Chat messages as one prompt: the tokenizer's chat template (with the generation
    prompt), else each message's content followed by a blank line ("system\n\nuser\n\n")."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['content']}\n\n" for m in messages)


def load_prompt(spec: dict[str, Any], root: Path | str, name: str = "",
                template_dirs: Iterable[str] = (), reads: set[str] | None = None) -> PromptTemplate:
    """Compile a prompt spec; raises PromptError (file and line) on any problem.

    `template_dirs`: project-relative folders of the project's declared templates, whose
    files this prompt may include (its own template's folder and prompts/ always may).
    `reads`, when given, collects the project-relative path of every template file the
    prompt asks for, while compiling and while rendering later (includes included).
    """
    root = Path(root)
    forms = [f for f in FORMS if f in spec]
    if len(forms) != 1:
        raise PromptError(
            f"{_who(name)} must have exactly one of template, text, chat (has {', '.join(forms) or 'none'})",
            path=f"prompts.{name}",
        )
    form = forms[0]
    variables = spec.get("variables")
    if not isinstance(variables, list) or not all(isinstance(v, str) for v in variables):
        raise PromptError(
            f"{_who(name)}: `variables` must be a list of names", path=f"prompts.{name}.variables"
        )
    if reads is not None and isinstance(spec.get("template"), str):
        reads.add(_normal(spec["template"]))
    sources = _sources(form, spec, root, name)
    own = [_normal(s.label) for s in sources if s.is_file]
    dirs = [_DEFAULT_TEMPLATE_DIR, *template_dirs, *(f.rpartition("/")[0] for f in own)]
    env = _make_env(_ProjectLoader(root, {s.label: s.source for s in sources if not s.is_file}, own, dirs, reads))
    for src in sources:
        try:
            env.get_template(src.label)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(
                f"{_who(name)}: template syntax error: {exc.message}",
                file=exc.name or src.label,
                line=exc.lineno or 0,
                path="" if src.is_file else _inline_path(name, src),
            ) from None
    return PromptTemplate(
        name=name,
        form=form,
        variables=tuple(variables),
        sources=sources,
        response_field=str(spec.get("response_field", "answer")),
        env=env,
    )


def _sources(form: str, spec: dict[str, Any], root: Path, name: str) -> list[TemplateSource]:
    inline_label = f"llmops.yaml prompts.{name}" if name else "llmops.yaml prompt"
    if form == "template":
        rel = spec["template"]
        try:
            text = read_template_file(root, rel)
        except PromptError as exc:
            raise PromptError(exc.summary, file=exc.file, path=f"prompts.{name}.template", hint=exc.hint) from None
        return [TemplateSource("text", rel, text, True)]
    if form == "text":
        if not isinstance(spec["text"], str):
            raise PromptError(f"{_who(name)}: `text` must be a string", path=f"prompts.{name}.text")
        return [TemplateSource("text", f"{inline_label}.text", spec["text"], False)]
    chat = spec["chat"]
    if not isinstance(chat, dict) or "user" not in chat or set(chat) - set(CHAT_ROLES):
        raise PromptError(
            f"{_who(name)}: `chat` must be {{system: TEXT, user: TEXT}} (system optional)",
            path=f"prompts.{name}.chat",
        )
    return [
        TemplateSource(role, f"{inline_label}.chat.{role}", str(chat[role]), False)
        for role in CHAT_ROLES
        if role in chat
    ]


def _first_use_line(ast: nodes.Template, var: str) -> int:
    lines = [n.lineno for n in ast.find_all(nodes.Name) if n.name == var and n.ctx == "load"]
    return min(lines) if lines else 0


def _template_frame(tb: TracebackType | None) -> tuple[str, int]:
    """The innermost traceback frame that runs template code: (template filename, line).

    Jinja2 rewrites tracebacks so template frames carry the template's filename (our
    labels) and line; every other frame is Python code.
    """
    found = ("", 0)
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not fname.endswith(".py") and not fname.startswith("<"):
            found = (fname, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _render_error(name: str, src: TemplateSource, exc: jinja2.TemplateError) -> PromptError:
    if isinstance(exc, jinja2.TemplateSyntaxError):  # an included template failed to parse
        label, line = exc.name or src.label, exc.lineno or 0
        kind = "template syntax error"
    else:
        label, line = _template_frame(exc.__traceback__)
        label = label or src.label
        kind = "sandbox refused" if isinstance(exc, jinja2.exceptions.SecurityError) else "cannot render"
    path = "" if src.is_file else _inline_path(name, src)
    return PromptError(f"{_who(name)}: {kind}: {exc.message or exc}", file=label, line=line, path=path)


def _who(name: str) -> str:
    return f"prompt '{name}'" if name else "prompt"


def _inline_path(name: str, src: TemplateSource) -> str:
    return f"prompts.{name}.text" if src.role == "text" else f"prompts.{name}.chat.{src.role}"


def render_prompt(
    spec: dict[str, Any], root: Path | str, variables: dict[str, Any], tokenizer: Any = None, name: str = ""
) -> str:
    """Render a prompt spec with exactly its declared variables (see `PromptTemplate.render`)."""
    return load_prompt(spec, root, name).render(variables, tokenizer)


def prompt_digest(spec: dict[str, Any], root: Path | str) -> str:
    """Content version of a prompt (`sha256:...`): templates, includes, variables, response_field."""
    return load_prompt(spec, root).digest()


def prompt_files(spec: dict[str, Any], root: Path | str) -> list[str]:
    """Project-relative files the prompt reads, for fingerprints."""
    return load_prompt(spec, root).files()


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens in `text`: the tokenizer's count, or whitespace-separated words without one."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_prompt(name: str, spec: dict[str, Any], root: Path | str, tokenizer: Any = None,
                 template_dirs: Iterable[str] = (), reads: set[str] | None = None) -> list[Diagnostic]:
    """Everything wrong with one prompt, for `llmops validate` (empty list: fine).

    Diagnostics about the template carry its file and line; those about the config
    (`variables`, `examples`) carry only `path` (e.g. `prompts.NAME.examples[0].expect`)
    so the caller can add the llmops.yaml position. `reads` collects the template files
    the check read (see `load_prompt`), so a cached result can be keyed on them.
    """
    return [_redacted(d) for d in _prompt_problems(name, spec, root, tokenizer, template_dirs, reads)]


def _redacted(d: Diagnostic) -> Diagnostic:
    return Diagnostic(summary=_shown(d.summary, 2 * MAX_SHOWN_CHARS), path=d.path, file=_shown(d.file),
                      line=d.line, column=d.column, hint=_shown(d.hint, 2 * MAX_SHOWN_CHARS), severity=d.severity)


def _prompt_problems(name: str, spec: dict[str, Any], root: Path | str, tokenizer: Any,
                     template_dirs: Iterable[str], reads: set[str] | None) -> list[Diagnostic]:
    try:
        prompt = load_prompt(spec, root, name, template_dirs, reads)
        used = prompt.used_variables()
    except PromptError as exc:
        return [exc.to_diagnostic()]
    diags: list[Diagnostic] = []
    for var, (label, line) in used.items():
        if var not in prompt.variables:
            diags.append(Diagnostic(
                summary=f"template uses variable '{var}' that prompts.{name}.variables does not declare",
                path=f"prompts.{name}.variables", file=label, line=line,
                hint=f"add '{var}' to variables, or remove it from the template",
            ))
    for var in prompt.variables:
        if var not in used:
            diags.append(Diagnostic(
                summary=f"variable '{var}' is declared but the template never uses it",
                path=f"prompts.{name}.variables", hint="remove it from variables, or use it in the template",
            ))
    if diags:
        return diags  # examples would only repeat these problems
    for i, example in enumerate(spec.get("examples") or []):
        diags.extend(_check_example(prompt, name, i, example, tokenizer))
    return diags


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _check_example(prompt: PromptTemplate, name: str, i: int, example: Any, tokenizer: Any) -> list[Diagnostic]:
    path = f"prompts.{name}.examples[{i}]"
    inputs = example.get("inputs", {}) if isinstance(example, dict) else None
    if not isinstance(inputs, dict):
        return [Diagnostic(summary=f"example {i + 1}: `inputs` must be a mapping of variable to value", path=path)]
    try:
        text = prompt.render(inputs, tokenizer, seconds=EXAMPLE_RENDER_SECONDS)
    except PromptError as exc:
        return [Diagnostic(summary=f"example {i + 1}: {exc.summary}", path=f"{path}.inputs",
                           file=exc.file, line=exc.line, hint=exc.hint)]
    expect = example.get("expect") or {}
    hint = f"rendered: {_shown(text, 80)!r}"
    diags: list[Diagnostic] = []

    def fail(key: str, summary: str) -> None:
        diags.append(Diagnostic(summary=f"example {i + 1}: {summary}", path=f"{path}.expect.{key}", hint=hint))

    for needle in _as_list(expect["contains"]) if "contains" in expect else []:
        if needle not in text:
            fail("contains", f"rendered prompt does not contain {needle!r}")
    for needle in _as_list(expect["not_contains"]) if "not_contains" in expect else []:
        if needle in text:
            fail("not_contains", f"rendered prompt contains {needle!r}")
    if "regex" in expect:
        try:
            if not re.search(str(expect["regex"]), text):
                fail("regex", f"rendered prompt does not match /{expect['regex']}/")
        except re.error as exc:
            fail("regex", f"invalid regular expression {expect['regex']!r}: {exc}")
    if "max_tokens" in expect:
        n = count_tokens(text, tokenizer)
        unit = "tokens" if tokenizer is not None else "words"
        if n > int(expect["max_tokens"]):
            fail("max_tokens", f"rendered prompt has {n} {unit}, more than max_tokens {expect['max_tokens']}")
    return diags
