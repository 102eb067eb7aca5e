"""Monitor in bounded memory (issue 15): streamed aggregates equal the all-rows computation,
on SQLite and PostgreSQL; the drift reference is cached by the training split's md5 and the
prompt's digest (hit, miss after a dataset change, a corrupt file rebuilt)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

import llmops.monitor.backend as store_module
from llmops.monitor.drift import (Reference, bag_counts, histogram, ks_pvalue, ks_statistic, ks_statistic_counts,
                                  psi, value_counts)
from llmops.monitor.records import record_to_row
from llmops.monitor.reference import CACHE_DIR, cached_reference, reference_key
from llmops.monitor.report_html import series
from llmops.monitor.runner import FAILED_SQL, run_monitor, window_where
from llmops.monitor.spec import MonitorSpec
from llmops.monitor.store import SqliteStore, open_store

NOW = 1_800_000_000.0
VOCAB = ("password reset account login email billing invoice refund order shipping delivery address card "
         "payment plan upgrade cancel subscription error crash app phone ignore all previous instructions").split()
SPEC = {"window": "2h", "drift": {"psi_max": 0.2, "ks_max": 0.3}, "feedback": {"min_positive_rate": 0.7},
        "latency": {"p95_ms_max": 90}, "error_rate_max": 0.05,
        "suspicious": {"max_prompt_chars": 200, "injection_max": 2}}


def sentence(rng: random.Random, mean: float) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(max(1, int(rng.gauss(mean, mean / 3)))))


def training(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": sentence(rng, 18), "answer": "ok"} for _ in range(n)]


def fill(store, n: int = 2500, seed: int = 1) -> None:  # noqa: ANN001 - any RequestStore
    """Varied traffic over three hours: lengths, latencies (some missing), 4xx/5xx, cut-off
    requests, empty prompts, clients with bursts, and feedback re-rated by its clients."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        status = rng.choice([200] * 20 + [429, 500, None])
        rec = {"id": f"r{seed}-{i}", "time": NOW - 3 * 3600 + i * (3 * 3600 / n) + rng.random(),
               "path": "/v1/completions", "client": f"c{rng.randrange(7)}" if i % 50 else "burst",
               "status": status, "error": "gone" if status is None and i % 2 else None,
               "latency_ms": None if i % 13 == 0 else round(rng.lognormvariate(4, 0.4), 3),
               "prompt": "" if i % 31 == 0 else sentence(rng, 30 if i > n // 2 else 18)}
        rows.append(record_to_row(rec))
    store.append_rows(rows)
    for i in range(0, n, 3):
        for client in ("a", "b", None):
            store.add_feedback(f"r{seed}-{i}", rng.choice(["up", "down", 4, 2]), now=NOW, client_id=client)
        store.add_feedback(f"r{seed}-{i}", "up", now=NOW, client_id="a")  # a re-rating: the latest counts


def all_rows_monitor(store, spec: dict, train: list[dict]) -> dict:  # noqa: ANN001
    """Today's computation before issue 15, from all rows read into Python at once."""
    ms = MonitorSpec.from_dict("m", spec)
    where, params = window_where(ms.window, NOW)
    lat = np.asarray([r[0] for r in store.query(
        f"SELECT latency_ms FROM requests WHERE {where} AND latency_ms IS NOT NULL", params)], dtype=np.float64)
    p50, p95 = np.percentile(lat, [50, 95])
    rows = store.query(f"SELECT prompt_words, token_bag FROM requests WHERE {where} AND prompt_words > 0", params)
    lengths = np.asarray([r[0] for r in rows], dtype=np.float64)
    ref_lengths = []
    from llmops.monitor.drift import row_text
    from llmops.monitor.records import token_bag, words
    bags = []
    for row in train:
        units = words(row_text(row))
        ref_lengths.append(len(units))
        bags.append(token_bag(units))
    ref = np.asarray(ref_lengths, dtype=np.float64)
    from llmops.monitor.drift import length_bins
    edges = length_bins(ref)
    d = ks_statistic(ref, lengths)
    peaks: dict = {}
    for client, _b, n in store.query(f"SELECT client, CAST(ts / 60 AS INTEGER), COUNT(*) FROM requests WHERE {where} "
                                     "GROUP BY client, CAST(ts / 60 AS INTEGER)", params):
        peaks[client] = max(peaks.get(client, 0), int(n))
    return {"latency": {"count": int(lat.size), "p50": round(float(p50), 3), "p95": round(float(p95), 3)},
            "requests": len(rows),
            "prompt_length": {"psi": round(psi(histogram(ref, edges), histogram(lengths, edges)), 6),
                              "ks": round(d, 6), "ks_pvalue": ks_pvalue(d, ref.size, lengths.size),
                              "mean_reference": round(float(ref.mean()), 3),
                              "mean_window": round(float(lengths.mean()), 3)},
            "token_psi": round(psi(bag_counts(bags), bag_counts(r[1] for r in rows)), 6),
            "peaks": peaks}


def check_streamed_equals_all_rows(tmp_path: Path, store) -> dict:  # noqa: ANN001
    train = training()
    report = run_monitor(tmp_path, "m", SPEC, train, now=NOW, store=store)
    m, want = report.metrics, all_rows_monitor(store, SPEC, train)
    assert m["latency_ms"] == want["latency"]
    assert m["drift"]["status"] == "ok" and m["drift"]["requests"] == want["requests"]
    assert m["drift"]["prompt_length"] == want["prompt_length"]
    assert m["drift"]["token_frequency"]["psi"] == want["token_psi"]
    assert {c["client"]: c["peak_per_minute"] for c in m["suspicious_clients"]} == {
        c: want["peaks"][c] for c in (c["client"] for c in m["suspicious_clients"])}
    assert m["drift"]["prompt_length"]["psi"] > 0.2 and report.alerts  # the longer half drifts: not a vacuous match
    return m


def test_streamed_monitor_equals_the_all_rows_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_module, "SCAN_BATCH", 97)  # many batches, a partial last one
    store = SqliteStore(tmp_path / "log.db")
    fill(store)
    got = []
    assert store.scan("SELECT seq FROM requests ORDER BY seq", (), got.append) == 2500
    assert [len(b) for b in got] == [97] * 25 + [75]
    assert [r[0] for b in got for r in b] == list(range(1, 2501))
    check_streamed_equals_all_rows(tmp_path, store)
    store.close()


def test_html_series_streamed_equal_the_all_rows_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_module, "SCAN_BATCH", 101)
    store = SqliteStore(tmp_path / "log.db")
    fill(store)
    report = run_monitor(tmp_path, "m", SPEC, training(), now=NOW, store=store)
    s = series(report, store)
    # the pre-issue-15 series, from all rows at once
    start, width, n = s["t"][0], s["t"][1] - s["t"][0], s["t"].size
    where, params = window_where(report.spec.window, NOW)
    arr = np.asarray([(r[0], np.nan if r[1] is None else r[1], r[2]) for r in store.query(
        f"SELECT ts, latency_ms, CASE WHEN {FAILED_SQL} THEN 1 ELSE 0 END FROM requests WHERE {where}", params)])
    b = np.clip(((arr[:, 0] - start) / width).astype(int), 0, n - 1)
    assert s["requests"].tolist() == np.bincount(b, minlength=n).tolist()
    assert s["errors"].tolist() == np.bincount(b, weights=arr[:, 2], minlength=n).tolist()
    p95 = np.full(n, np.nan)
    for i in np.unique(b):
        lat = arr[b == i, 1]
        lat = lat[~np.isnan(lat)]
        if lat.size:
            p95[i] = np.percentile(lat, 95)
    np.testing.assert_array_equal(s["p95"], p95)
    rows = store.query(f"SELECT ts, prompt_words, token_bag FROM requests WHERE {where} AND prompt_words > 0", params)
    bd = np.clip(((np.asarray([r[0] for r in rows]) - start) / width).astype(int), 0, n - 1)
    ref = report.reference
    psi_tokens = np.full(n, np.nan)
    for i in np.unique(bd):
        idx = np.nonzero(bd == i)[0]
        if idx.size >= 30:
            psi_tokens[i] = psi(ref.token_counts, bag_counts(rows[j][2] for j in idx))
    np.testing.assert_array_equal(s["psi_tokens"], psi_tokens)
    assert np.isfinite(s["psi_length"]).sum() > 10 and np.isfinite(s["positive_rate"]).sum() > 10
    store.close()


def test_postgres_streams_the_same_numbers_as_sqlite(tmp_path: Path, pg_cluster, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_module, "SCAN_BATCH", 89)
    import psycopg

    schema = f"scale_{tmp_path.name.replace('-', '_').lower()}"  # tables of this test's own
    with psycopg.connect(pg_cluster.requests_uri, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
    sqlite = SqliteStore(tmp_path / "log.db")
    pg = open_store(f"{pg_cluster.requests_uri}?options=-csearch_path%3D{schema}")
    try:
        fill(sqlite)
        fill(pg)
        got = []
        assert pg.scan("SELECT token_bag FROM requests ORDER BY seq", (), got.append) == 2500
        assert len(got) == 29 and all(isinstance(r[0], (bytes, memoryview)) for r in got[0])
        lite = check_streamed_equals_all_rows(tmp_path / "a", sqlite)
        post = check_streamed_equals_all_rows(tmp_path / "b", pg)
        for key in ("requests", "error_rate", "latency_ms", "feedback", "drift"):
            assert post[key] == lite[key], key
    finally:
        sqlite.close()
        pg.close()


def test_ks_and_histogram_over_counts_equal_those_over_raw_values():
    rng = np.random.default_rng(7)
    for _ in range(20):
        x = rng.integers(1, 60, size=int(rng.integers(1, 500))).astype(np.float64)
        y = rng.integers(5, 90, size=int(rng.integers(1, 500))).astype(np.float64)
        assert ks_statistic_counts(*value_counts(x), *value_counts(y)) == ks_statistic(x, y)
    ref = Reference.from_rows(training())
    lengths = rng.integers(1, 60, size=999).astype(np.float64)
    raw_ks = ks_statistic(ref.lengths, lengths)
    assert ref.length_drift(lengths)["ks"] == round(raw_ks, 6) and raw_ks > 0
    assert ref.length_drift(lengths)["psi"] == round(psi(ref.expected_lengths, histogram(lengths, ref.edges)), 6)
    back = Reference.from_arrays(ref.to_arrays())
    assert back.length_drift(lengths) == ref.length_drift(lengths) and back.rows == ref.rows == 300


# --- the reference cache -----------------------------------------------------------------

PROJECT_YAML = """\
version: 1
project: refcache
datasets:
  tickets: {source: data/tickets.jsonl}
prompts:
  support: {template: prompts/support.j2, variables: [question], response_field: answer}
base_models:
  tiny: {path: models/tiny}
finetunes:
  lora: {base_model: tiny, dataset: tickets, prompt: support, adapter: {type: lora, r: 4, alpha: 8}}
deployments:
  prod: {model: lora}
monitors:
  prod: {drift: {psi_max: 0.2}}
"""
TRAIN = ".llmops/data/tickets/train.jsonl"


def make_project(root: Path, rows: list[dict]) -> Path:
    """A project as `llmops apply` leaves it for the monitor: the train split and its lock
    entries (the md5 is the real file's)."""
    from llmops.providers.datasets import file_md5

    (root / "prompts").mkdir(parents=True)
    (root / "models" / "tiny").mkdir(parents=True)  # never loaded: drift needs no model
    (root / "prompts" / "support.j2").write_text("### Question:\n{{ question }}\n### Answer:\n")
    (root / "data").mkdir()
    (root / "data" / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / TRAIN).parent.mkdir(parents=True)
    (root / TRAIN).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "llmops.yaml").write_text(PROJECT_YAML)
    write_lock(root, file_md5(root / TRAIN))
    return root


def write_lock(root: Path, md5: str) -> None:
    def entry(**over: object) -> dict:
        return {"fingerprint": "sha256:test", "spec": {}, "files": {}, "upstreams": {}, "inputs": {}, "outputs": {},
                **over}
    lock = {"lock_version": 1, "resources": {
        "datasets.tickets": entry(outputs={"train": {"path": TRAIN, "md5": md5}}),
        "finetunes.lora": entry(spec={"base_model": "tiny", "dataset": "tickets", "prompt": "support"},
                                upstreams={"datasets.tickets": "sha256:d", "base_models.tiny": "sha256:b"}),
        "deployments.prod": entry(outputs={"model": "finetunes.lora"})}}
    (root / "llmops.lock").write_text(yaml.safe_dump(lock))


def reference_of(root: Path) -> tuple[Reference | None, str]:
    from llmops.monitor.run import training_reference
    from llmops.engine.project import open_project

    rows, reference, how = training_reference(open_project(root), "prod")
    assert rows is None  # no embedding drift: the rows are not handed on
    return reference, how


def test_reference_is_cached_by_the_datasets_md5_and_rebuilt_when_it_changes(tmp_path: Path):
    from llmops.providers.datasets import file_md5

    root = make_project(tmp_path / "p", training())
    first, how = reference_of(root)
    assert how == "built" and first.rows == 300
    files = list((root / CACHE_DIR).glob("*.npz"))
    assert len(files) == 1
    again, how = reference_of(root)
    assert how == "hit" and again.to_arrays().keys() == first.to_arrays().keys()
    assert all(np.array_equal(a, b) for a, b in zip(again.to_arrays().values(), first.to_arrays().values()))
    (root / TRAIN).unlink()  # a hit reads no training row: the split need not even be on disk
    assert reference_of(root)[1] == "hit"

    changed = training(120, seed=5)  # a new dataset applied: new file, new md5 in the lock
    (root / TRAIN).write_text("".join(json.dumps(r) + "\n" for r in changed))
    write_lock(root, file_md5(root / TRAIN))
    rebuilt, how = reference_of(root)
    assert how == "built" and rebuilt.rows == 120 and len(list((root / CACHE_DIR).glob("*.npz"))) == 2

    (root / "prompts" / "support.j2").write_text("Q: {{ question }}\nA:")  # the prompt renders rows differently
    assert reference_of(root)[1] == "built"


@pytest.mark.parametrize("damage", [b"", b"not a zip file", "truncate", "other-arrays", "other-key"])
def test_a_corrupt_reference_cache_file_is_rebuilt_not_a_crash(tmp_path: Path, damage: object):
    root = make_project(tmp_path / "p", training())
    built, _ = reference_of(root)
    path, = (root / CACHE_DIR).glob("*.npz")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "other-arrays":
        arrays = built.to_arrays()
        arrays["counts"] = arrays["counts"][:-1]
        np.savez(path, key=np.asarray(path.stem), **arrays)
    elif damage == "other-key":
        np.savez(path, key=np.asarray("0" * 64), **built.to_arrays())
    else:
        path.write_bytes(damage)
    again, how = reference_of(root)
    assert how == "rebuilt" and again.rows == built.rows
    assert reference_of(root)[1] == "hit"  # the rebuilt file replaced the broken one


def test_cached_reference_without_a_key_or_rows_stores_nothing(tmp_path: Path):
    assert reference_key("", "sha256:p") is None
    ref, how = cached_reference(tmp_path, None, lambda: Reference.from_rows(training(40)))
    assert how == "uncached" and ref.rows == 40
    assert cached_reference(tmp_path, "k" * 64, lambda: None) == (None, "built")
    assert not (tmp_path / CACHE_DIR).exists() or not list((tmp_path / CACHE_DIR).iterdir())
    assert reference_key("a", "p") != reference_key("b", "p") != reference_key("b", "q")


def test_llmops_monitor_uses_the_cached_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from llmops.cli.main import main

    root = make_project(tmp_path / "p", training())
    store = SqliteStore(root / ".llmops/monitor/prod.db")
    fill(store)
    store.close()
    outputs = []
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(["-C", str(root), "monitor", "--json"])
        outputs.append(json.loads(capsys.readouterr().out)[0]["metrics"]["drift"])
    assert outputs[0]["status"] == "ok" and outputs[0]["reference_rows"] == 300
    assert outputs[1]["prompt_length"] == outputs[0]["prompt_length"]  # the second from the cache
    assert len(list((root / CACHE_DIR).glob("*.npz"))) == 1
