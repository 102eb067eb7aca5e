"""The registered fine-tune is a real MLflow pyfunc model: it loads and serves with MLflow's
own tools on a machine that has none of the project's files, and `fetch_model` restores
the adapter and tokenizer elsewhere, byte for byte.

Everything is real: a tiny Llama built by llmops.train.build, one short training job,
MLflow on SQLite, `mlflow models serve` on loopback, a Hugging Face cache laid out on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmops.errors import ProviderError
from llmops.hashing import file_sha256 as sha256_file, folder_sha256

COLOURS = ["red", "blue", "green", "yellow"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
PROMPT = "Q: What colour is box 1?\nA:"
HF_REPO, HF_COMMIT = "llmops-tests/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


def rows(n: int) -> list[dict]:
    return [{"question": f"What colour is box {k % 4}?", "answer": f"Box {k % 4} is {COLOURS[k % 4]}."}
            for k in range(n)]


def write_jsonl(path: Path, items: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """One tiny fine-tune trained, logged and registered; then the project's .llmops is moved away."""
    from llmops.train.build import build_tiny_model
    from llmops.train.job import run_job

    tmp = tmp_path_factory.mktemp("mlflow-model")
    state = tmp / "proj" / ".llmops"
    base = state / "models" / "tiny"
    texts = [f"Q: {r['question']}\nA: {r['answer']}" for r in rows(8)]
    build_tiny_model({"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
                      "max_position_embeddings": 128}, texts, base)
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    (tmp / "store").mkdir()
    spec = {
        "name": "colours",
        "base_model": str(base),
        "train_path": write_jsonl(state / "data" / "train.jsonl", rows(16)),
        "eval_path": write_jsonl(state / "data" / "eval.jsonl", rows(4)),
        "prompt": {"text": "Q: {{ question }}\nA:", "response_field": "answer"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS},
        "training": {"epochs": 1, "learning_rate": 3e-2, "batch_size": 4, "max_seq_length": 64, "seed": 7},
        "output_dir": str(state / "runs" / "colours"),
        "checkpoint_dir": str(state / "runs" / "colours" / "checkpoints"),
        "tracking_uri": uri,
        "artifact_location": (tmp / "store" / "artifacts").as_uri(),
        "experiment": "tests",
        "registered_model": "colours",
        "tags": {"llmops.address": "finetunes.colours", "llmops.base_model_files_sha": "def456"},
    }
    result = run_job(spec)
    # Nothing of the project may be needed any more: not the base model, not the run folder.
    away = state.with_name(".llmops-away")
    state.rename(away)
    model_dir = away / "runs" / "colours" / "model"
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return SimpleNamespace(tmp=tmp, uri=uri, spec=spec, result=result, model_dir=model_dir,
                           base=away / "models" / "tiny", elsewhere=elsewhere, away=away)


def client(trained):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)


def fresh_python(script: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> dict:
    """Run `script` in a new interpreter (cwd elsewhere); it prints one JSON line last."""
    full = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **env}
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=full, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1] if len(sys.argv) > 1 else {uri!r})
a = model.predict([{prompt!r}, "Q: What colour is box 2?\\nA:"], params={{"max_new_tokens": 6}})
b = model.predict(pd.DataFrame({{"prompt": [{prompt!r}]}}))
c = model.predict({prompt!r}, params={{"max_new_tokens": 3, "temperature": 0.7}})
print(json.dumps({{"a": a, "b": b, "c": c, "llmops": any(m.split(".")[0] == "llmops" for m in sys.modules)}}))
"""


# -- the logged and registered model -------------------------------------------------------------


@pytest.mark.slow
def test_run_artifact_model_is_a_pyfunc_model_with_portable_adapter(trained):
    import yaml

    c = client(trained)
    run_id = trained.result["run_id"]
    names = {a.path for a in c.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/llmops_pyfunc.py", "model/requirements.txt", "model/artifacts"} <= names
    assert not {"model/adapter", "model/tokenizer"} & names  # the old raw-folder layout is gone

    local = Path(c.download_artifacts(run_id, "model", str(trained.tmp / "downloaded")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert pyfunc["model_code_path"] == "llmops_pyfunc.py"
    assert str(trained.tmp) not in (local / "MLmodel").read_text()  # no path of the training machine
    assert pyfunc["config"]["base_model"] == {"artifact": "base_model"}  # a build: base is bundled
    assert set(pyfunc["artifacts"]) == {"adapter", "tokenizer", "base_model"}
    params = {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"max_new_tokens": 64, "temperature": 0.0}
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "required": True}]
    reqs = (local / "requirements.txt").read_text().split()
    for name in ("torch", "transformers", "peft", "safetensors"):
        assert any(r.startswith(f"{name}>=") for r in reqs), reqs
    assert "prompt" in (local / "input_example.json").read_text()
    assert "cloudpickle" not in " ".join(p.name for p in local.rglob("*"))  # nothing was pickled
    bundled = local / pyfunc["artifacts"]["base_model"]["path"]
    assert folder_sha256(bundled) == folder_sha256(trained.base)

    # No absolute path of this machine in the adapter: neither logged nor in output_dir/model.
    for adapter in (local / "artifacts" / "adapter", trained.model_dir / "adapter"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "base_model"
        for f in adapter.iterdir():
            if f.suffix in (".json", ".md"):
                text = f.read_text()
                assert str(trained.tmp) not in text and str(Path(trained.tmp).resolve()) not in text, f
    logged_weights = local / "artifacts" / "adapter" / "adapter_model.safetensors"
    assert sha256_file(logged_weights) == trained.result["adapter"]["sha256"]

    # The registered version points at that run artifact and keeps its lineage tags.
    version = c.get_model_version("colours", trained.result["model_version"])
    assert version.source == f"{c.get_run(run_id).info.artifact_uri}/model"
    assert version.tags["llmops.adapter_sha256"] == trained.result["adapter"]["sha256"]
    assert version.tags["llmops.base_model_files_sha"] == "def456" and version.tags["llmops.run_id"] == run_id
    # output_dir/model is laid out as before: what the lock records.
    assert Path(trained.result["adapter"]["path"]).name == "adapter"
    assert Path(trained.result["tokenizer"]["path"]).parent.name == "model"


@pytest.mark.slow
def test_registered_alias_loads_in_a_fresh_process_without_the_project(trained):
    client(trained).set_registered_model_alias("colours", "production", trained.result["model_version"])
    out = fresh_python(LOAD_AND_PREDICT.format(uri="models:/colours@production", prompt=PROMPT), trained.elsewhere,
                       {"MLFLOW_TRACKING_URI": trained.uri})
    assert len(out["a"]) == 2 and all(isinstance(t, str) for t in out["a"])
    assert len(out["b"]) == 1 and isinstance(out["b"][0], str)
    assert out["b"][0].startswith(out["a"][0][:1])  # greedy: the same prompt starts the same way
    assert len(out["c"]) == 1 and isinstance(out["c"][0], str)
    assert not out["llmops"]  # the model's code needs no llmops


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(trained):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": trained.uri}
    # The server execs `uvicorn` by name: this interpreter's scripts folder must be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = open(trained.tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/colours/{trained.result['model_version']}",
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
        cwd=trained.elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ping", proc, trained.tmp / "serve.log", 150)

        def invoke(body: dict) -> list:
            req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        listed = invoke({"inputs": [PROMPT, "Q: What colour is box 3?\nA:"], "params": {"max_new_tokens": 4}})
        records = invoke({"dataframe_records": [{"prompt": PROMPT}]})
        assert len(listed) == 2 and all(isinstance(t, str) for t in listed)
        assert len(records) == 1 and isinstance(records[0], str)
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it when it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- fetch_model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fetch_model_restores_adapter_and_tokenizer_byte_for_byte(trained):
    from llmops.train.mlflow_model import fetch_model

    dest = trained.tmp / "other-machine" / "model"
    dest.mkdir(parents=True)  # an empty folder is replaced
    paths = fetch_model(client(trained), trained.result["run_id"], dest)
    assert paths == {"adapter": dest / "adapter", "tokenizer": dest / "tokenizer"}
    assert sorted(p.name for p in dest.iterdir()) == ["adapter", "tokenizer"]
    assert sha256_file(dest / "adapter" / "adapter_model.safetensors") == trained.result["adapter"]["sha256"]
    assert folder_sha256(dest / "tokenizer") == trained.result["tokenizer"]["sha256"]
    assert folder_sha256(dest / "adapter") == folder_sha256(trained.model_dir / "adapter")
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no temp folder left beside it

    (dest / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")  # a damaged copy is replaced whole
    fetch_model(client(trained), trained.result["run_id"], dest)
    assert sha256_file(dest / "adapter" / "adapter_model.safetensors") == trained.result["adapter"]["sha256"]


@pytest.mark.slow
def test_fetch_model_names_the_run_and_the_fix(trained):
    from llmops.train.mlflow_model import fetch_model

    c = client(trained)
    with pytest.raises(ProviderError) as err:
        fetch_model(c, "0" * 32, trained.tmp / "nowhere" / "model")
    assert "0" * 32 in err.value.message and trained.uri in err.value.message
    assert not (trained.tmp / "nowhere" / "model").exists()

    experiment = c.get_experiment_by_name("tests").experiment_id
    bare = c.create_run(experiment, tags={"llmops.address": "finetunes.bare"}).info.run_id
    with pytest.raises(ProviderError) as err:
        fetch_model(c, bare, trained.tmp / "bare" / "model")
    assert bare in err.value.message and "llmops apply --replace finetunes.bare" in err.value.message
    assert not (trained.tmp / "bare" / "model").exists()


@pytest.mark.slow
def test_fetch_model_through_a_tracking_server_with_proxied_artifacts(trained, tmp_path):
    """A second machine sees only the server: the run's artifacts come through its proxy."""
    from llmops.train.job import run_job
    from llmops.train.mlflow_model import fetch_model
    from services import mlflow_server

    folder = tmp_path / "server"
    folder.mkdir()
    with mlflow_server(f"sqlite:///{folder}/mlflow.db", folder / "artifacts", log_file=folder / "server.log") as url:
        spec = {**trained.spec, "tracking_uri": url, "artifact_location": None, "base_model": str(trained.base),
                "output_dir": str(tmp_path / "run"), "checkpoint_dir": str(tmp_path / "run" / "checkpoints"),
                "training": {**trained.spec["training"], "max_steps": 1}}
        for key in ("train_path", "eval_path"):
            spec[key] = spec[key].replace("/.llmops/", "/.llmops-away/")
        result = run_job(spec)
        dest = tmp_path / "elsewhere" / "model"
        fetch_model(client(SimpleNamespace(uri=url)), result["run_id"], dest)
        assert sha256_file(dest / "adapter" / "adapter_model.safetensors") == result["adapter"]["sha256"]
        assert folder_sha256(dest / "tokenizer") == result["tokenizer"]["sha256"]
        assert list((folder / "artifacts").rglob("MLmodel"))  # stored by the server, not beside the job


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{proc.args[:4]} exited:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, f"no answer from {url} in {seconds} s:\n" + log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("http://alice:s3cret@mlflow.example:5000/", "http://***@mlflow.example:5000/"),
        ("https://token@mlflow.example/x", "https://***@mlflow.example/x"),
        ("postgresql+psycopg://bob:pw@db:5432/mlflow", "postgresql+psycopg://bob:***@db:5432/mlflow"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
    ],
)
def test_error_messages_show_the_tracking_uri_without_credentials(uri, shown):
    from llmops.train.mlflow_model import _safe_uri

    assert _safe_uri(SimpleNamespace(tracking_uri=uri)) == shown


# -- an hf: base is referenced, not bundled ------------------------------------------------------


@pytest.mark.slow
def test_hf_base_is_a_reference_loaded_from_the_cache(trained):
    from llmops.train.mlflow_model import base_reference, make_adapter_portable, save_model

    base = base_reference({"base_model": "/somewhere/snapshot", "base_model_ref": {"hf": HF_REPO, "commit": HF_COMMIT}})
    assert base == {"hf": HF_REPO, "commit": HF_COMMIT}
    assert base_reference({"base_model": "/x/tiny"}) == {"path": "/x/tiny"}

    adapter = trained.tmp / "hf" / "adapter"
    shutil.copytree(trained.model_dir / "adapter", adapter)
    make_adapter_portable(adapter, base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (HF_REPO, HF_COMMIT)
    assert sha256_file(adapter / "adapter_model.safetensors") == trained.result["adapter"]["sha256"]

    model = save_model(trained.tmp / "hf" / "pyfunc", adapter, trained.model_dir / "tokenizer", base)
    assert sorted(p.name for p in (model / "artifacts").iterdir()) == ["adapter", "tokenizer"]
    cache = trained.tmp / "hf" / "hub"
    from test_base_models import fake_hf_cache

    fake_hf_cache(cache, HF_REPO, trained.base, commit=HF_COMMIT)
    out = fresh_python(LOAD_AND_PREDICT.format(uri=str(model), prompt=PROMPT), trained.elsewhere,
                       {"HF_HUB_CACHE": str(cache), "HF_HOME": str(trained.tmp / "hf" / "home")})
    assert len(out["a"]) == 2 and all(isinstance(t, str) for t in out["a"])


def test_importing_the_module_stays_light():
    script = (
        "import sys, llmops.train.mlflow_model, llmops.train.job, llmops.train.track\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
