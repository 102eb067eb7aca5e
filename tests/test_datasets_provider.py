"""DatasetsProvider against real DVC in a temporary git repo (no CLI: the provider is called directly)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ProviderContext
from llmops.providers.datasets import DVC_YAML_HEADER, DatasetsProvider, load_split, render_dvc_yaml

from conftest import dvc_cli
from test_charts import bar_counts


TICKETS = {
    "source": "data/tickets.jsonl",
    "prepare": [
        {"dedupe": {"fields": ["question"], "near_duplicate_threshold": 0.9}},
        {"filter": {"min_chars": {"question": 8}}},
        {"split": {"eval_fraction": 0.25, "seed": 13}},
    ],
}


def _rows(n: int = 40, salt: str = "") -> str:
    rows = [{"question": f"how do I fix issue {i} on my account{salt}", "answer": f"do step {i}"} for i in range(n)]
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"question": "short", "answer": "x"})  # filtered out
    return "".join(json.dumps(r) + "\n" for r in rows)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class Env:
    def __init__(self, root: Path, datasets: dict[str, dict], settings: dict | None = None) -> None:
        self.root = root
        self.logs: list[tuple[str, str]] = []
        self.ctx = ProviderContext(
            root=root,
            state_dir=root / ".llmops",
            settings=settings or {},
            config={"version": 1, "project": "t", "datasets": datasets},
            log=lambda addr, msg: self.logs.append((addr, msg)),
        )
        self.provider = DatasetsProvider(self.ctx)

    def apply(self, name: str = "tickets") -> dict[str, Any]:
        spec = self.ctx.config["datasets"][name]
        request = ApplyRequest(
            address=f"datasets.{name}", name=name, spec=spec, action="create", fingerprint="f", before=None, upstream={},
            log=lambda message: self.ctx.log(f"datasets.{name}", message),  # as the engine hands it in
        )
        result = self.provider.apply(request)
        self.locked = LockedResource(address=f"datasets.{name}", fingerprint="f", inputs=result.inputs, outputs=result.outputs)
        return {"outputs": result.outputs, "inputs": result.inputs}

    def dvc_status(self) -> str:
        proc = dvc_cli(self.root, "status")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


@pytest.fixture
def env(project) -> Env:
    project.write({".gitignore": ".llmops/\n", "data/tickets.jsonl": _rows()})
    return Env(project.root, {"tickets": TICKETS})


def test_apply_writes_outputs_lock_and_dvc_is_clean(env: Env) -> None:
    result = env.apply()
    out, root = result["outputs"], env.root
    assert (root / ".git").is_dir() and (root / ".dvc").is_dir()
    train, evals = root / out["train"]["path"], root / out["eval"]["path"]
    assert out["train"]["path"] == ".llmops/data/tickets/train.jsonl"
    assert out["train"]["md5"] == _md5(train) and out["eval"]["md5"] == _md5(evals)
    assert out["train"]["rows"] == len(train.read_text().splitlines())
    assert out["train"]["rows"] + out["eval"]["rows"] == 40 and out["eval"]["rows"] > 0
    assert result["inputs"] == {"source_md5": _md5(root / "data/tickets.jsonl")}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["datasets-tickets"]
    assert {o["path"]: o["md5"] for o in lock["outs"]}[out["train"]["path"]] == out["train"]["md5"]
    assert "Data and pipelines are up to date." in env.dvc_status()
    # dvc.yaml: llmops header, one stage running this interpreter
    text = (root / "dvc.yaml").read_text()
    assert text.startswith(DVC_YAML_HEADER) and text == render_dvc_yaml({"tickets": TICKETS})
    # no path of this machine: any clone with its own venv agrees with `dvc status`
    assert yaml.safe_load(text)["stages"]["datasets-tickets"]["cmd"] == \
        "python -m llmops.data.stage .llmops/data/tickets/spec.json"
    # profile and report
    profile = json.loads((root / out["profile"]).read_text())
    assert profile["duplicates_removed"]["exact"] == 1 and profile["steps"][1]["removed"] == 1
    report = root / out["report"]
    assert report.name == "index.html" and "tickets" in report.read_text()
    charts = list(report.parent.glob("*.svg"))
    rows = {split: data["rows"] for split, data in profile["outputs"].items()}
    assert len(charts) == 2 and all(bar_counts(c) == rows for c in charts)
    # DVC's own log lines reach the context's log, not stdout
    assert any("datasets-tickets" in msg for _, msg in env.logs)
    # a second apply with nothing changed does not run the stage again
    mtime = train.stat().st_mtime_ns
    assert env.apply()["outputs"] == out and train.stat().st_mtime_ns == mtime


def test_refresh_reports_missing_and_changed_outputs(env: Env) -> None:
    env.apply()
    out = env.locked.outputs
    assert env.provider.refresh("tickets", TICKETS, env.locked) == []
    (env.root / out["train"]["path"]).unlink()
    with open(env.root / out["eval"]["path"], "a") as fh:
        fh.write('{"question": "sneaked in"}\n')
    drifts = env.provider.refresh("tickets", TICKETS, env.locked)
    assert [(d.reason, d.action) for d in drifts] == [(
        "outputs missing: .llmops/data/tickets/train.jsonl; outputs changed on disk: "
        ".llmops/data/tickets/eval.jsonl; the DVC cache holds the locked content: will be checked out, "
        "not rebuilt", "restore")]
    assert "Data and pipelines are up to date." not in env.dvc_status()
    # restore checks them out of the cache as they were, without running the stage
    stage_runs = (env.root / ".llmops/data/tickets/profile.json").stat().st_mtime_ns
    request = ApplyRequest(address="datasets.tickets", name="tickets", spec=TICKETS, action="restore",
                           fingerprint="f", before=env.locked, upstream={})
    assert env.provider.restore(request).outputs == out
    assert env.provider.refresh("tickets", TICKETS, env.locked) == []
    assert (env.root / ".llmops/data/tickets/profile.json").stat().st_mtime_ns == stage_runs
    assert "Data and pipelines are up to date." in env.dvc_status()
    # without the cache nothing holds it: a rebuild, and the plan says why
    shutil.rmtree(env.root / ".dvc" / "cache")
    (env.root / out["train"]["path"]).unlink()
    drifts = env.provider.refresh("tickets", TICKETS, env.locked)
    assert [d.action for d in drifts] == ["replace"] and "will be rebuilt" in drifts[0].reason
    assert env.apply()["outputs"] == out


def test_source_change_updates_md5s_and_load_split(env: Env) -> None:
    first = env.apply()
    rows = load_split(env.root, first["outputs"], "train")
    assert len(rows) == first["outputs"]["train"]["rows"] and set(rows[0]) == {"question", "answer"}
    (env.root / "data/tickets.jsonl").write_text(_rows(60, salt=" today"))
    second = env.apply()
    assert second["inputs"]["source_md5"] != first["inputs"]["source_md5"]
    assert second["outputs"]["train"]["md5"] != first["outputs"]["train"]["md5"]
    assert second["outputs"]["train"]["rows"] + second["outputs"]["eval"]["rows"] == 60
    with pytest.raises(ProviderError, match="changed on disk since it was applied"):
        load_split(env.root, first["outputs"], "train")
    assert "today" in load_split(env.root, second["outputs"], "eval")[0]["question"]


def test_without_split_only_train(project) -> None:
    project.write({"data/faq.csv": "question,answer\nwhat is up,nothing\nwho are you,a bot\nwhat is up,nothing\n"})
    spec = {"source": "data/faq.csv", "prepare": [{"dedupe": {}}]}
    env = Env(project.root, {"faq": spec})
    out = env.apply("faq")["outputs"]
    assert "eval" not in out and out["train"]["rows"] == 2
    assert not (project.root / ".llmops/data/faq/eval.jsonl").exists()
    assert load_split(project.root, out, "train") == [
        {"answer": "nothing", "question": "what is up"},
        {"answer": "a bot", "question": "who are you"},
    ]
    with pytest.raises(ProviderError, match="no 'eval' split.*add a `split` step"):
        load_split(project.root, out, "eval")


def test_push_to_local_remote(env: Env, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    env.ctx.settings["dvc_remote"] = str(remote)
    out = env.apply()["outputs"]
    assert out["remote"] == str(remote)
    for split in ("train", "eval"):
        md5 = out[split]["md5"]
        pushed = remote / "files" / "md5" / md5[:2] / md5[2:]
        assert pushed.read_bytes() == (env.root / out[split]["path"]).read_bytes()
    assert "llmops" in (env.root / ".dvc" / "config").read_text()


@pytest.mark.parametrize(
    "files, spec, expect",
    [
        ({"data/t.jsonl": '{"question": "fine"}\n{"question": nope}\n'}, {"source": "data/t.jsonl"},
         r"datasets.t: .*data/t.jsonl:2: malformed JSON"),
        ({}, {"source": "data/missing.jsonl"}, r"datasets.t: source file data/missing.jsonl not found"),
        ({"data/t.txt": "x"}, {"source": "data/t.txt"}, r"datasets.t: data/t.txt: unknown file extension"),
        ({"data/t.jsonl": '{"q": "x"}\n'}, {"source": "data/t.jsonl", "prepare": [{"map": {"template": {"p": "{{ nope }}"}}}]},
         r"datasets.t: prepare\[0\].map.template.p: row 1 .*'nope' is undefined"),
        ({}, {"source": "../outside.jsonl"}, r"outside the project"),
    ],
)
def test_bad_source_is_a_provider_error(project, files: dict, spec: dict, expect: str) -> None:
    project.write(files)
    env = Env(project.root, {"t": spec})
    with pytest.raises(ProviderError, match=expect):
        env.apply("t")


def test_foreign_dvc_yaml_is_not_overwritten(env: Env) -> None:
    (env.root / "dvc.yaml").write_text("stages:\n  mine:\n    cmd: echo hi\n")
    with pytest.raises(ProviderError, match="dvc.yaml was not written by llmops"):
        env.apply()
    assert "mine" in (env.root / "dvc.yaml").read_text()


def test_parallel_applies_then_delete_one(project) -> None:
    project.write({"data/a.jsonl": _rows(20), "data/b.jsonl": _rows(30, salt=" b")})
    a = {"source": "data/a.jsonl", "prepare": [{"split": {"eval_fraction": 0.3}}]}
    b = {"source": "data/b.jsonl"}
    env = Env(project.root, {"a": a, "b": b})
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = env.apply(name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results) == {"a", "b"}
    assert "Data and pipelines are up to date." in env.dvc_status()
    # delete `a`: its stage, lock entry and files go; `b` stays up to date
    del env.ctx.config["datasets"]["a"]
    env.provider.delete("a", LockedResource(address="datasets.a", fingerprint="f", outputs=results["a"]["outputs"]))
    stages = yaml.safe_load((project.root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["datasets-b"]
    assert list(yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]) == ["datasets-b"]
    assert not (project.root / ".llmops/data/a").exists() and not (project.root / ".llmops/reports/datasets/a").exists()
    assert (project.root / ".llmops/data/b/train.jsonl").exists()
    assert "Data and pipelines are up to date." in env.dvc_status()
