"""llmops.data: reading/writing rows, the prepare steps, MinHash, profile, report and the stage entry point."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmops.data import io as dio
from llmops.data.minhash import banding, near_duplicates, shingles, signatures
from llmops.data.profile import build_profile, split_profile
from llmops.data.stage import run_stage
from llmops.data.steps import dedupe, filter_rows, map_rows, normalize_steps, run_steps, split_rows
from llmops.errors import LlmopsError


# --- io ----------------------------------------------------------------------------------


def test_write_jsonl_is_deterministic_sorted_utf8(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    dio.write_jsonl(path, [{"b": 1, "a": "é"}, {"z": None, "c": [1, 2]}])
    assert path.read_bytes() == '{"a": "é", "b": 1}\n{"c": [1, 2], "z": null}\n'.encode()
    assert dio.read_jsonl(path) == [{"a": "é", "b": 1}, {"c": [1, 2], "z": None}]


def test_read_formats_give_the_same_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": "hello, world", "a": "x"}, {"q": 'say "hi"', "a": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.csv").write_text('q,a\n"hello, world",x\n"say ""hi""",y\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert dio.read_rows(tmp_path / name) == rows, name
    # `format` overrides the extension
    (tmp_path / "data.txt").write_text('{"q": "x"}\n')
    assert dio.read_rows(tmp_path / "data.txt", "jsonl") == [{"q": "x"}]


@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("bad.jsonl", '{"a": 1}\n{"a": \n', "bad.jsonl:2: malformed JSON"),
        ("list.jsonl", '{"a": 1}\n\n[1, 2]\n', "list.jsonl:3: expected a JSON object"),
        ("ragged.csv", "a,b\n1,2\n1,2,3\n", "ragged.csv:3: 3 values but the header has 2"),
        ("dup.csv", "a,a\n1,2\n", "dup.csv:1: duplicate column names"),
        ("data.xlsx", "x", "unknown file extension '.xlsx'"),
        ("broken.parquet", "not parquet", "broken.parquet: cannot read Parquet"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path: Path, name: str, text: str, expect: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(LlmopsError) as err:
        dio.read_rows(tmp_path / name)
    assert expect in err.value.message


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(LlmopsError, match="nope.jsonl: source file not found"):
        dio.read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(LlmopsError, match="unknown format 'xml'"):
        dio.read_rows(tmp_path / "x.jsonl", "xml")


# --- dedupe ------------------------------------------------------------------------------


def test_dedupe_exact_on_fields_keeps_first() -> None:
    rows = [
        {"q": "a", "a": 1},
        {"q": "b", "a": 2},
        {"q": "a", "a": 3},  # same q as row 0
        {"q": "b", "a": 2},  # identical to row 1
    ]
    kept, stats = dedupe(rows, fields=["q"])
    assert kept == rows[:2] and stats == {"removed_exact": 2, "removed_near": 0}
    kept, stats = dedupe(rows)  # all fields
    assert kept == rows[:3] and stats["removed_exact"] == 1


def test_dedupe_near_duplicates_with_known_rows() -> None:
    base = "my laptop will not turn on after the latest update and the screen stays black all day"
    rows = [
        {"q": base},
        {"q": base.replace("black", "dark")},  # one word changed: Jaccard 11/17 = 0.65
        {"q": base + " please"},  # one word added: Jaccard 15/16
        {"q": "how can I change the billing address on my invoice for next month"},
        {"q": "BASE: " + base.upper()},  # case and a prefix word: shingles almost all shared
    ]
    kept, stats = dedupe(rows, fields=["q"], near_duplicate_threshold=0.8, num_perm=128)
    assert [r["q"] for r in kept] == [rows[0]["q"], rows[1]["q"], rows[3]["q"]]
    assert stats == {"removed_exact": 0, "removed_near": 2}
    # a low threshold also catches the one-word change; nothing unrelated goes
    kept, _ = dedupe(rows, fields=["q"], near_duplicate_threshold=0.4, num_perm=128)
    assert [r["q"] for r in kept] == [rows[0]["q"], rows[3]["q"]]


def test_minhash_estimate_tracks_jaccard() -> None:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(400)]
    a = [rng.choice(vocab) for _ in range(80)]
    for keep in (20, 50, 70):
        b = a[:keep] + [rng.choice(vocab) for _ in range(80 - keep)]
        sa, sb = shingles(" ".join(a), 3), shingles(" ".join(b), 3)
        true = len(sa & sb) / len(sa | sb)
        sig, _ = signatures([" ".join(a), " ".join(b)], num_perm=512)
        assert abs(float((sig[0] == sig[1]).mean()) - true) < 0.08, (keep, true)


def test_signatures_are_fixed_per_text() -> None:
    texts = ["one two three four", "five six seven", ""]
    s1, v1 = signatures(texts, num_perm=32)
    s2, v2 = signatures(list(reversed(texts)), num_perm=32)
    assert (s1 == s2[::-1]).all() and list(v1) == [True, True, False]
    assert shingles("A b", 3) == {"a b"} and shingles("", 3) == set()


def _pairwise_reference(sig, valid, threshold: float) -> list[int]:
    need = banding(sig.shape[1], threshold)[2]
    kept: list[int] = []
    dropped: list[int] = []
    for i in range(len(sig)):
        if not valid[i]:
            continue
        if any(int((sig[i] == sig[k]).sum()) >= need for k in kept):
            dropped.append(i)
        else:
            kept.append(i)
    return dropped


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.9, 1.0])
def test_lsh_banding_finds_what_all_pairs_find(threshold: float) -> None:
    rng = random.Random(threshold)
    vocab = [f"t{i}" for i in range(60)]
    docs = []
    for _ in range(300):
        if docs and rng.random() < 0.5:  # a mutated copy of an earlier document
            words = rng.choice(docs).split()
            for _ in range(rng.randint(0, 3)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = [rng.choice(vocab) for _ in range(12)]
        docs.append(" ".join(words))
    sig, valid = signatures(docs, num_perm=32, shingle_size=2)
    got = near_duplicates(sig, valid, threshold)
    assert got == _pairwise_reference(sig, valid, threshold)
    assert got  # the data has near duplicates at every threshold tried


# --- filter / map ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kept_ids, removed_by",
    [
        ({"min_chars": {"q": 4}}, [1, 2], {"min_chars.q": 2}),
        ({"max_chars": {"q": 4}}, [0, 1, 3], {"max_chars.q": 1}),
        ({"required": ["a"]}, [0, 2], {"required.a": 2}),
        ({"regex": {"q": r"^\w+$"}}, [0, 1], {"regex.q": 2}),
        ({"min_chars": {"q": 1}, "required": ["a"]}, [0, 2], {"min_chars.q": 1, "required.a": 1}),
    ],
)
def test_filter(args: dict, kept_ids: list[int], removed_by: dict) -> None:
    rows = [
        {"id": 0, "q": "abc", "a": "x"},
        {"id": 1, "q": "abcd", "a": "  "},
        {"id": 2, "q": "ab cd e", "a": "y"},
        {"id": 3, "a": None},
    ]
    kept, stats = filter_rows(rows, **args)
    assert [r["id"] for r in kept] == kept_ids
    assert stats == {"removed": len(rows) - len(kept_ids), "removed_by": removed_by}


def test_map_rename_template_keep() -> None:
    rows = [{"question": "Hi?", "answer": "Hello", "junk": 1}]
    out, stats = map_rows(
        rows,
        rename={"question": "q"},
        template={"prompt": "Q: {{ q }}\nA:", "answer": "{{ answer | upper }}"},
        keep=["prompt", "answer", "q"],
    )
    assert out == [{"answer": "HELLO", "prompt": "Q: Hi?\nA:", "q": "Hi?"}]
    assert stats["fields"] == ["answer", "prompt", "q"]


def test_map_template_errors_are_clear() -> None:
    with pytest.raises(LlmopsError, match=r"map.template.p: row 2 .*'missing' is undefined"):
        map_rows([{"missing": 1}, {"x": 1}], template={"p": "{{ missing }}"})
    with pytest.raises(LlmopsError, match="map.template.p: invalid Jinja2"):
        map_rows([{"x": 1}], template={"p": "{% if %}"})
    # the environment is sandboxed: no reaching into Python internals
    with pytest.raises(LlmopsError, match="map.template.p"):
        map_rows([{"x": "s"}], template={"p": "{{ x.__class__.__mro__[1].__subclasses__() }}"})
    # and bounded like prompt templates: no unbounded repetition or loops from a pull request
    with pytest.raises(LlmopsError, match="map.template.p: row 1: over the render budget"):
        map_rows([{"x": "s"}], template={"p": "{{ x * 300000000 }}"})
    with pytest.raises(LlmopsError, match="map.template.p: row 1: over the render budget"):
        map_rows([{"x": "s"}], template={"p": "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}"
                                               "{% endfor %}"})


# --- split -------------------------------------------------------------------------------


def test_split_is_deterministic_and_order_independent() -> None:
    rows = [{"i": i, "text": f"row {i}"} for i in range(2000)]
    train, evals = split_rows(rows, eval_fraction=0.2, seed=13)
    assert 300 < len(evals) < 500 and len(train) + len(evals) == 2000
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    train2, evals2 = split_rows(shuffled, eval_fraction=0.2, seed=13)
    assert {r["i"] for r in evals2} == {r["i"] for r in evals}
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # input order is kept
    _, evals3 = split_rows(rows, eval_fraction=0.2, seed=14)
    assert {r["i"] for r in evals3} != {r["i"] for r in evals}
    # a row's split depends on its content only: adding rows does not move it
    _, evals4 = split_rows(rows[:1000], eval_fraction=0.2, seed=13)
    assert {r["i"] for r in evals4} == {r["i"] for r in evals if r["i"] < 1000}


@pytest.mark.parametrize("fraction, n_eval", [(0.0, 0), (1.0, 3), (0.001, 1), (0.999, 2)])
def test_split_edges(fraction: float, n_eval: int) -> None:
    rows = [{"i": i} for i in range(3)]
    train, evals = split_rows(rows, eval_fraction=fraction, seed=0)
    assert len(evals) == n_eval and len(train) == 3 - n_eval


# --- normalize / run_steps ---------------------------------------------------------------


def test_normalize_fills_defaults() -> None:
    steps = normalize_steps([{"dedupe": {"fields": ["q"]}}, {"split": None}])
    assert steps == [
        {"dedupe": {"fields": ["q"], "near_duplicate_threshold": None, "num_perm": 64, "shingle_size": 3}},
        {"split": {"eval_fraction": 0.1, "seed": 0}},
    ]
    assert normalize_steps(None) == []


@pytest.mark.parametrize(
    "prepare, expect",
    [
        ([{"shuffle": {}}], r"prepare\[0\]: unknown step 'shuffle'"),
        ([{"dedupe": {}, "split": {}}], r"prepare\[0\]: each step is an object with exactly one key"),
        ([{"filter": {"min_len": 3}}], r"prepare\[0\].filter: unknown key\(s\) min_len"),
        ([{"split": {}}, {"filter": {}}], r"prepare\[0\]: `split` must be the last step"),
        ([{"dedupe": {"near_duplicate_threshold": 1.5}}], r"near_duplicate_threshold: must be a number in \(0, 1\]"),
        ([{"filter": {"regex": {"q": "("}}}], r"prepare\[0\].filter.regex.q: invalid regular expression"),
        ([{"filter": {"min_chars": {"q": -1}}}], r"min_chars: lengths must be integers >= 0"),
        ([{"split": {"eval_fraction": "half"}}], r"eval_fraction: must be a number from 0 to 1"),
        ({"dedupe": {}}, r"prepare: must be a list of steps"),
        ([{"dedupe": {"fields": []}}], r"dedupe.fields: must name at least one field"),
    ],
)
def test_normalize_rejects_bad_steps(prepare, expect: str) -> None:
    with pytest.raises(LlmopsError, match=expect):
        normalize_steps(prepare)


def test_run_steps_counts_each_step() -> None:
    rows = [{"q": f"question {i % 30}", "a": "x" if i % 7 else ""} for i in range(60)]
    steps = normalize_steps(
        [{"dedupe": {"fields": ["q"]}}, {"filter": {"required": ["a"]}}, {"split": {"eval_fraction": 0.5, "seed": 2}}]
    )
    result = run_steps(rows, steps)
    assert [s["rows_in"] for s in result.steps] == [60, 30, result.steps[1]["rows_out"]]
    assert result.steps[0]["removed_exact"] == 30
    assert result.steps[1]["removed"] == sum(1 for r in rows[:30] if not r["a"])
    total = len(result.splits["train"]) + len(result.splits["eval"])
    assert result.steps[2]["rows_out"] == {"train": len(result.splits["train"]), "eval": len(result.splits["eval"])}
    assert total == result.steps[1]["rows_out"]
    assert list(run_steps(rows, []).splits) == ["train"]


# --- profile and stage -------------------------------------------------------------------


def test_split_profile_null_rates_and_lengths() -> None:
    rows = [{"q": "abcd", "a": "x"}, {"q": "ab"}, {"q": "", "a": None}, {"q": "abcdefghij", "a": [1]}]
    prof = split_profile(rows)
    assert prof["rows"] == 4
    assert prof["fields"]["q"]["null_rate"] == 0.25
    assert prof["fields"]["a"]["null_rate"] == 0.5
    assert prof["fields"]["q"]["chars"] == {"min": 2, "mean": 5.333, "p50": 4.0, "p95": 9.4, "max": 10}
    assert prof["fields"]["a"]["chars"]["max"] == 3  # [1] as JSON text
    doc = build_profile("t", "s.jsonl", "jsonl", 9, [{"removed_exact": 2}, {"removed_near": 3}], {"train": rows})
    assert doc["duplicates_removed"] == {"exact": 2, "near": 3} and doc["source"]["rows"] == 9


def _write_stage_project(root: Path, prepare: list, source_text: str | None = None) -> Path:
    (root / "data").mkdir(parents=True)
    if source_text is None:
        rows = [{"question": f"how do I fix problem number {i} today", "answer": f"answer {i}"} for i in range(40)]
        rows += rows[:5]
        source_text = "".join(json.dumps(r) + "\n" for r in rows)
    (root / "data" / "src.jsonl").write_text(source_text)
    spec = {
        "name": "demo",
        "source": "data/src.jsonl",
        "format": "jsonl",
        "prepare": prepare,
        "output_dir": ".llmops/data/demo",
        "report_dir": ".llmops/reports/datasets/demo",
        "error_file": ".llmops/data/demo/stage-error.txt",
    }
    path = root / ".llmops" / "data" / "demo" / "spec.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(spec))
    return path


def test_stage_entry_point_writes_outputs_and_report(tmp_path: Path) -> None:
    from test_charts import bar_counts

    spec = _write_stage_project(tmp_path, [{"dedupe": {"fields": ["question"]}}, {"split": {"eval_fraction": 0.25, "seed": 1}}])
    proc = subprocess.run(
        [sys.executable, "-m", "llmops.data.stage", str(spec.relative_to(tmp_path))],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    out = tmp_path / ".llmops" / "data" / "demo"
    train, evals = dio.read_jsonl(out / "train.jsonl"), dio.read_jsonl(out / "eval.jsonl")
    assert len(train) + len(evals) == 40 and evals
    profile = json.loads((out / "profile.json").read_text())
    assert profile["outputs"]["train"]["rows"] == len(train) and profile["duplicates_removed"]["exact"] == 5
    assert [s["step"] for s in profile["steps"]] == ["dedupe", "split"]
    report = tmp_path / ".llmops" / "reports" / "datasets" / "demo"
    assert json.loads((report / "profile.json").read_text()) == profile
    html = (report / "index.html").read_text()
    charts = sorted(report.glob("*.svg"))
    assert len(charts) == 2  # one per field, each bar a row count of its split
    for chart in charts:
        assert f'src="{chart.name}"' in html
        assert bar_counts(chart) == {"train": len(train), "eval": len(evals)}
    # same input, same bytes
    before = {p.name: p.read_bytes() for p in (*out.glob("*.json*"), *charts)}
    run_stage(json.loads(spec.read_text()), tmp_path)
    assert {p.name: p.read_bytes() for p in (*out.glob("*.json*"), *charts)} == before


def test_stage_without_split_writes_train_only(tmp_path: Path) -> None:
    spec = _write_stage_project(tmp_path, [{"map": {"keep": ["question"]}}])
    profile = run_stage(json.loads(spec.read_text()), tmp_path)
    out = tmp_path / ".llmops" / "data" / "demo"
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["train.jsonl"]
    assert len(dio.read_jsonl(out / "train.jsonl")) == 45 == profile["outputs"]["train"]["rows"]
    assert list(profile["outputs"]["train"]["fields"]) == ["question"]


def test_stage_bad_data_exits_1_with_message(tmp_path: Path) -> None:
    spec = _write_stage_project(tmp_path, [], source_text='{"q": "ok"}\n{"q": oops}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "llmops.data.stage", str(spec)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "datasets.demo: " in proc.stderr and "src.jsonl:2: malformed JSON" in proc.stderr
    error = (tmp_path / ".llmops" / "data" / "demo" / "stage-error.txt").read_text()
    assert error.strip() == proc.stderr.strip().removeprefix("error: ")
    assert not (tmp_path / ".llmops" / "data" / "demo" / "train.jsonl").exists()
