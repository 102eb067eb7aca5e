"""Prompt templates: strict rendering, file:line errors, validate-time checks, digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmops.templating.prompt_template import (
    PromptError,
    check_prompt,
    load_prompt,
    messages_to_text,
    prompt_digest,
    prompt_files,
    render_prompt,
)

SUPPORT = "You help customers of {{ product }}.\nQuestion: {{ question }}\nAnswer:\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write(tmp_path, {"prompts/support.j2": SUPPORT})


def spec(**extra) -> dict:
    return {"template": "prompts/support.j2", "variables": ["product", "question"], **extra}


def test_file_template_renders_with_exactly_its_variables(root: Path) -> None:
    text = render_prompt(spec(), root, {"product": "Acme", "question": "Where is my order?"})
    assert text == "You help customers of Acme.\nQuestion: Where is my order?\nAnswer:\n"


def test_text_without_trailing_whitespace_gets_a_newline_before_the_answer(root: Path) -> None:
    assert render_prompt({"text": "Q: {{ q }} A:", "variables": ["q"]}, root, {"q": "hi"}) == "Q: hi A:\n"
    assert render_prompt({"text": "Q: {{ q }} ", "variables": ["q"]}, root, {"q": "hi"}) == "Q: hi "


def test_missing_variable_names_file_and_line_of_first_use(root: Path) -> None:
    with pytest.raises(PromptError) as err:
        render_prompt(spec(), root, {"product": "Acme"}, name="support")
    assert (err.value.file, err.value.line) == ("prompts/support.j2", 2)
    assert "prompts/support.j2:2" in err.value.message and "'question'" in err.value.message


def test_extra_variable_is_an_error(root: Path) -> None:
    with pytest.raises(PromptError, match="'user' is not declared") as err:
        render_prompt(spec(), root, {"product": "A", "question": "q", "user": "bob"})
    assert err.value.file == "prompts/support.j2"


def test_strict_undefined_attribute_reports_the_line(root: Path) -> None:
    write(root, {"prompts/attr.j2": "line one\n{{ ticket.title }}\n"})
    with pytest.raises(PromptError) as err:
        render_prompt({"template": "prompts/attr.j2", "variables": ["ticket"]}, root, {"ticket": {"body": "x"}})
    assert (err.value.file, err.value.line) == ("prompts/attr.j2", 2)
    assert "title" in err.value.message


def test_sandbox_refuses_unsafe_attribute_access(root: Path) -> None:
    bad = {"text": "ok\n{{ q.__class__.__mro__ }}", "variables": ["q"]}
    with pytest.raises(PromptError, match="sandbox refused") as err:
        render_prompt(bad, root, {"q": "x"}, name="evil")
    assert err.value.line == 2 and err.value.path == "prompts.evil.text"


def test_validate_reports_undeclared_and_unused_variables(root: Path) -> None:
    diags = check_prompt("support", {"template": "prompts/support.j2", "variables": ["product", "customer"]}, root)
    by_summary = {d.summary: d for d in diags}
    assert len(diags) == 2
    undeclared = next(d for s, d in by_summary.items() if "'question'" in s)
    assert (undeclared.file, undeclared.line) == ("prompts/support.j2", 2)
    unused = next(d for s, d in by_summary.items() if "'customer'" in s)
    assert unused.path == "prompts.support.variables" and "never uses" in unused.summary


def test_validate_reports_syntax_error_with_line(root: Path) -> None:
    write(root, {"prompts/broken.j2": "fine\nstill fine\n{{ question }\n"})
    [diag] = check_prompt("b", {"template": "prompts/broken.j2", "variables": ["question"]}, root)
    assert (diag.file, diag.line) == ("prompts/broken.j2", 3) and "syntax" in diag.summary


def test_validate_missing_template_file(root: Path) -> None:
    [diag] = check_prompt("x", {"template": "prompts/nope.j2", "variables": []}, root)
    assert "not found" in diag.summary and diag.path == "prompts.x.template"


def test_included_templates_count_for_variables_files_and_digest(root: Path) -> None:
    write(root, {"prompts/main.j2": "Intro\n{% include 'prompts/part.j2' %}", "prompts/part.j2": "Q: {{ question }}\n"})
    s = {"template": "prompts/main.j2", "variables": ["question"]}
    assert check_prompt("m", s, root) == []
    assert render_prompt(s, root, {"question": "why"}) == "Intro\nQ: why\n"
    assert prompt_files(s, root) == ["prompts/main.j2", "prompts/part.j2"]
    before = prompt_digest(s, root)
    (root / "prompts/part.j2").write_text("Question: {{ question }}\n")
    assert prompt_digest(s, root) != before
    diags = check_prompt("m", {"template": "prompts/main.j2", "variables": []}, root)
    assert [(d.file, d.line) for d in diags] == [("prompts/part.j2", 1)]


def test_digest_is_the_content_version(root: Path) -> None:
    base = prompt_digest(spec(), root)
    assert base.startswith("sha256:") and base == prompt_digest(spec(), root)
    assert prompt_digest(spec(examples=[{"inputs": {}, "expect": {}}], description="x"), root) == base
    assert prompt_digest(spec(response_field="reply"), root) != base
    assert prompt_digest({"text": SUPPORT, "variables": ["product", "question"]}, root) != base
    (root / "prompts/support.j2").write_text(SUPPORT.replace("customers", "clients"))
    assert prompt_digest(spec(), root) != base


def test_examples_are_checked_on_the_rendered_text(root: Path) -> None:
    examples = [
        {"inputs": {"product": "Acme", "question": "Refund?"},
         "expect": {"contains": ["Acme", "Refund?"], "not_contains": "password", "regex": r"^You help", "max_tokens": 20}},
        {"inputs": {"product": "Acme", "question": "my password is hunter2"},
         "expect": {"contains": "Zeta", "not_contains": ["password"], "regex": r"^Question", "max_tokens": 5}},
        {"inputs": {"product": "Acme"}, "expect": {"contains": "Acme"}},
    ]
    diags = check_prompt("support", spec(examples=examples), root)
    paths = sorted(d.path for d in diags)
    assert paths == [
        "prompts.support.examples[1].expect.contains",
        "prompts.support.examples[1].expect.max_tokens",
        "prompts.support.examples[1].expect.not_contains",
        "prompts.support.examples[1].expect.regex",
        "prompts.support.examples[2].inputs",
    ]
    words = next(d for d in diags if d.path.endswith("max_tokens"))
    assert "11 words" in words.summary  # whitespace split without a tokenizer
    missing = next(d for d in diags if d.path.endswith("inputs"))
    assert "'question'" in missing.summary and missing.line == 2


def test_invalid_example_regex_is_reported(root: Path) -> None:
    ex = [{"inputs": {"product": "a", "question": "b"}, "expect": {"regex": "(unclosed"}}]
    [diag] = check_prompt("support", spec(examples=ex), root)
    assert "invalid regular expression" in diag.summary


def test_exactly_one_form(root: Path) -> None:
    [diag] = check_prompt("two", {"text": "a", "chat": {"user": "b"}, "variables": []}, root)
    assert "exactly one of" in diag.summary


def test_chat_without_chat_template_joins_parts(root: Path) -> None:
    chat = {"chat": {"system": "Be brief.", "user": "Q: {{ q }}"}, "variables": ["q"]}
    assert render_prompt(chat, root, {"q": "hi"}) == "Be brief.\n\nQ: hi\n\n"
    user_only = {"chat": {"user": "{{ q }}"}, "variables": ["q"]}
    assert render_prompt(user_only, root, {"q": "hi"}) == "hi\n\n"


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["be brief please", "question answer hello"],
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<eos>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = chat_template
    return fast


def test_chat_goes_through_the_tokenizers_chat_template(root: Path) -> None:
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    chat = {"chat": {"system": "Be brief.", "user": "Q: {{ q }}"}, "variables": ["q"]}
    tok = _tokenizer(template)
    assert render_prompt(chat, root, {"q": "hi"}, tokenizer=tok) == "[system] Be brief.\n[user] Q: hi\n[assistant]"
    messages = [{"role": "user", "content": "hello"}]
    assert messages_to_text(messages, _tokenizer(None)) == "hello\n\n"


def test_max_tokens_counts_tokenizer_tokens_when_given(root: Path) -> None:
    tok = _tokenizer(None)
    s = {"text": "hello question answer", "variables": [], "examples": [{"inputs": {}, "expect": {"max_tokens": 2}}]}
    [diag] = check_prompt("t", s, root, tokenizer=tok)
    n = len(tok("hello question answer\n", add_special_tokens=False)["input_ids"])
    assert f"{n} tokens" in diag.summary


def test_loaded_prompt_knows_its_form_and_response_field(root: Path) -> None:
    p = load_prompt(spec(response_field="reply"), root, "support")
    assert (p.form, p.is_chat, p.response_field, p.variables) == ("template", False, "reply", ("product", "question"))


def test_templates_never_read_outside_the_project_or_leak_the_environment(root: Path, monkeypatch) -> None:
    from llmops.templating.prompt_template import check_prompt

    monkeypatch.setenv("GITHUB_TOKEN", "ghp_unit_test_secret_value")
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / "env.j2").symlink_to("/proc/self/environ")
    spec = {"text": "{% include 'prompts/env.j2' %}{{ q }}", "variables": ["q"],
            "examples": [{"inputs": {"q": "x"}, "expect": {"contains": "NEVER"}}]}
    found = [d.format() for d in check_prompt("p", spec, root)]
    assert len(found) == 1 and "outside the project" in found[0], found
    with pytest.raises(PromptError, match="absolute"):
        load_prompt({"template": "/etc/passwd", "variables": []}, root, "p")
    spec = {"text": "{{ q }} ghp_unit_test_secret_value", "variables": ["q"],
            "examples": [{"inputs": {"q": "x"}, "expect": {"contains": "NEVER"}}]}
    found = [d.format() for d in check_prompt("p", spec, root)]
    assert found and all("ghp_unit_test_secret_value" not in f for f in found), found


@pytest.mark.parametrize("body", [
    "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}{{ q }}",
    # A recursive loop's `loop(...)` takes items too: 100,000 x 100,000 without a `for` per level.
    "{% for i in range(100000) recursive %}{% if loop.depth == 1 %}{{ loop(range(100000)) }}{% endif %}"
    "{% endfor %}{{ q }}",
])
def test_loops_have_a_budget_at_any_render_in_any_thread(root: Path, body: str) -> None:
    """Apply, training and serving render without a wall clock (and a server off the main
    thread, where no alarm can fire): the loop budget alone stops a runaway loop there."""
    import threading

    from llmops.templating.prompt_template import MAX_RENDER_ITERATIONS, load_prompt

    prompt = load_prompt({"text": body, "variables": ["q"]}, root, "p")
    failures: list[str] = []

    def render() -> None:
        with pytest.raises(PromptError, match=f"loops ran more than {MAX_RENDER_ITERATIONS:,} times") as info:
            prompt.render({"q": "x"})
        failures.append(str(info.value))

    worker = threading.Thread(target=render)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and len(failures) == 1, failures
    ok = load_prompt({"text": "{% for i in range(1000) %}{% for j in range(999) %}{% endfor %}{% endfor %}{{ q }}",
                      "variables": ["q"]}, root, "ok")
    assert ok.render({"q": "x"}) == "x\n"  # 999,000 iterations: inside the budget, every render anew
    assert ok.render({"q": "y"}) == "y\n"


@pytest.mark.parametrize("body", [
    "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}{{ q }}",
    "{{ 'a' * 300000000 }}{{ q }}",
    "{{ q|center(300000000) }}",
])
def test_example_rendering_has_a_size_and_time_budget(root: Path, body: str) -> None:
    from llmops.templating.prompt_template import check_prompt

    spec = {"text": body, "variables": ["q"], "examples": [{"inputs": {"q": "x"}, "expect": {"contains": "x"}}]}
    found = [d.format() for d in check_prompt("p", spec, root)]
    assert len(found) == 1 and "over the render budget" in found[0], found
