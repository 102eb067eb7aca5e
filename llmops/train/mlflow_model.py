"""The fine-tune as a real MLflow model: a pyfunc directory, and restoring it elsewhere.

`save_model` writes an MLflow **pyfunc** model "from code": the logged python file is the
self-contained `LOADER_SOURCE` below (it needs mlflow, torch, transformers and peft, never
llmops), so nothing is cloudpickled and `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` or
`mlflow models serve` work on any machine with those packages. Layout:

    MLmodel  llmops_pyfunc.py  requirements.txt  python_env.yaml  conda.yaml
    input_example.json  serving_input_example.json
    artifacts/adapter/      the peft adapter (adapter_config.json without local paths)
    artifacts/tokenizer/    the tokenizer training used
    artifacts/<folder>/     only for a `build:`/`path:` base: the base model folder, bundled as
                            artifact `base_model` (MLflow names the folder after the source)

MLmodel's pyfunc `artifacts` maps each artifact name to its folder: read it, never guess.

An `hf:` base is not bundled: MLmodel's pyfunc `config.base_model` names it as
`{"hf": "ORG/NAME", "commit": SHA}`, loaded with `from_pretrained(repo, revision=commit)`
(from the Hugging Face cache, or the hub when online). A bundled base is
`{"artifact": "base_model"}`.

`fetch_model` is the reverse for llmops itself: it downloads only the adapter and tokenizer
of a run's `model` artifact and lays them out as the training job leaves
`output_dir/model/`, so paths recorded in the lock work unchanged on another machine.

torch and mlflow are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmops.errors import ProviderError

MODEL_ARTIFACT = "model"  # the run's artifact path that holds the pyfunc model
BASE_ARTIFACT = "base_model"  # the bundled base model's artifact name, and the adapter's marker for it
CODE_FILE = "llmops_pyfunc.py"
REQUIRED_PACKAGES = ("torch", "transformers", "peft", "safetensors")
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0}

# The model's code, logged as the model itself (MLflow "models from code"). It must stay
# self-contained: it runs where llmops is not installed.
LOADER_SOURCE = '''\
"""MLflow pyfunc model of an llmops LoRA fine-tune (a model from code; needs no llmops).

Artifacts: `adapter` (peft), `tokenizer`, and `base_model` when the base is bundled; else the
pyfunc config's `base_model` is {"hf": repo, "commit": sha}. Input: prompts (a string
column, a list of strings, a string); params `max_new_tokens` and `temperature` (0 = greedy).
Output: the generated continuation of each prompt.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LoraTextGenerator(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        ref = config.get("base_model") or {"artifact": "base_model"}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if self.device == "cuda" else torch.float32
        if ref.get("hf"):
            base = AutoModelForCausalLM.from_pretrained(ref["hf"], revision=ref.get("commit") or None, dtype=dtype)
        else:
            base = AutoModelForCausalLM.from_pretrained(context.artifacts[ref["artifact"]], dtype=dtype)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        tok.padding_side = "left"  # generation continues every prompt from its last token
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.defaults = {k: config[k] for k in ("max_new_tokens", "temperature") if k in config}

    # After MLflow enforces the logged (column) signature, the input is a DataFrame; this
    # hint is one MLflow derives no signature from, so the logged signature rules.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        import torch

        prompts = _prompts(model_input)
        if not prompts:
            return []
        params = {"max_new_tokens": 64, "temperature": 0.0, **self.defaults, **(params or {})}
        temperature = float(params["temperature"] or 0.0)
        kwargs: dict[str, Any] = {"max_new_tokens": int(params["max_new_tokens"]),
                                  "pad_token_id": self.tokenizer.pad_token_id}
        kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        width = enc["input_ids"].shape[1]
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def _prompts(model_input: Any) -> list[str]:
    """Prompts from a DataFrame (its `prompt` column, else its first), a list, a dict or a string."""
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("prompt", next(iter(model_input.values()), []))
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    if isinstance(values, str):
        values = [values]
    flat: list[str] = []
    for value in values:  # {"inputs": {"prompt": [...]}} arrives as one row holding a list
        if isinstance(value, (list, tuple)):
            flat.extend(str(v) for v in value)
        else:
            flat.append(str(value))
    return flat


mlflow.models.set_model(LoraTextGenerator())
'''


def base_reference(job: dict[str, Any]) -> dict[str, str]:
    """Where the model finds its base: job spec `base_model_ref` ({"hf", "commit"}) or the folder.

    Returns {"hf": repo, "commit": sha} for a Hugging Face base, else {"path": folder} (to bundle).
    """
    ref = job.get("base_model_ref") or {}
    if isinstance(ref, dict) and ref.get("hf"):
        return {"hf": str(ref["hf"]), "commit": str(ref.get("commit") or "")}
    return {"path": str(job["base_model"])}


def make_adapter_portable(adapter_dir: Path, base: dict[str, str]) -> None:
    """Replace the machine's base-model path in the adapter's config and model card.

    peft records the folder the base was loaded from; a copy elsewhere must name the hf repo
    (and commit) or the bundled artifact instead. The weights file is not touched, so the
    adapter's sha256 stays what it was.
    """
    from llmops.fsutil import atomic_write_text

    config_path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    old = config.get("base_model_name_or_path")
    new = base["hf"] if base.get("hf") else BASE_ARTIFACT
    config["base_model_name_or_path"] = new
    if base.get("hf") and base.get("commit"):
        config["revision"] = base["commit"]
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = Path(adapter_dir) / "README.md"
    if old and old != new and card.is_file():
        atomic_write_text(card, card.read_text(encoding="utf-8").replace(str(old), new))


def pip_requirements() -> list[str]:
    """`torch>=X` etc. for the installed versions (local tags such as +cpu dropped)."""
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{name}>={Version(version(name)).base_version}" for name in REQUIRED_PACKAGES]


def signature() -> Any:
    """One string column of prompts in, one string per prompt out; decoding params with defaults.

    The input column is left unnamed on purpose: MLflow then accepts a list of strings, a
    string and a DataFrame (`{"inputs": [...]}` and `{"dataframe_records": [{"prompt": ...}]}`
    alike); a named `prompt` column would make it refuse plain lists. The input example
    shows the `prompt` column.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
            ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params)


def save_model(path: Path, adapter_dir: Path, tokenizer_dir: Path, base: dict[str, str]) -> Path:
    """Write the pyfunc model directory at `path` (which must not exist yet); returns it.

    `base` comes from `base_reference`: an hf reference goes into the model config, a folder
    is bundled as artifact `base_model`.
    """
    from llmops.integrations.mlflow import quiet_env

    quiet_env()
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    path = Path(path)
    artifacts = {"adapter": str(adapter_dir), "tokenizer": str(tokenizer_dir)}
    if base.get("hf"):
        config: dict[str, Any] = {"base_model": {"hf": base["hf"], "commit": base.get("commit", "")}}
    else:
        artifacts[BASE_ARTIFACT] = str(base["path"])
        config = {"base_model": {"artifact": BASE_ARTIFACT}}
    with tempfile.TemporaryDirectory(prefix="llmops-pyfunc-") as tmp:
        code = Path(tmp) / CODE_FILE
        code.write_text(LOADER_SOURCE, encoding="utf-8")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(code),
            artifacts=artifacts,
            model_config={**config, **DEFAULT_PARAMS},
            signature=signature(),
            input_example=pd.DataFrame({"prompt": ["### Question:\nWhere is my order?\n### Answer:\n"]}),
            pip_requirements=pip_requirements(),
        )
    # MLflow records where the code file and artifacts came from (paths of this machine) but
    # loads them by basename / relative path: keep no local path in the logged model.
    mlmodel = Model.load(str(path))
    flavor = mlmodel.flavors["python_function"]
    flavor["model_code_path"] = CODE_FILE
    for entry in (flavor.get("artifacts") or {}).values():
        entry["uri"] = entry["path"]
    mlmodel.save(str(path / "MLmodel"))
    return path


def fetch_model(client: Any, run_id: str, dest: Path, adapter_sha256: str | None = None) -> dict[str, Path]:
    """Download run `run_id`'s adapter and tokenizer into `dest/adapter` and `dest/tokenizer`.

    Only those two artifacts of the pyfunc `model` are downloaded (not a bundled base). They
    land in a temp folder beside `dest` that replaces it whole, so `dest` is never half
    written. The adapter's sha256 is checked, before `dest` is touched, against `adapter_sha256`
    (what the caller's lock pins) or else the run's `llmops.adapter_sha256` tag.
    Raises ProviderError when the run, its `model` artifact or a part is missing.
    """
    from llmops.hashing import file_sha256

    dest = Path(dest)
    run = _get_run(client, run_id)
    parts = _artifact_parts(client, run, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
    try:
        staged = tmp / "model"
        staged.mkdir()
        (tmp / "download").mkdir()
        for name, artifact_path in parts.items():
            try:
                local = client.download_artifacts(run_id, artifact_path, str(tmp / "download"))
            except Exception as exc:  # noqa: BLE001 - stores raise many types for a failed download
                raise _missing(client, run, f"cannot download {artifact_path} ({type(exc).__name__}: {exc})")
            shutil.move(local, staged / name)
        expected = adapter_sha256 or run.data.tags.get("llmops.adapter_sha256")
        weights = staged / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise _missing(client, run, f"{parts['adapter']} has no adapter_model.safetensors")
        if expected and file_sha256(weights) != expected:
            raise _missing(client, run, f"the downloaded adapter's sha256 is not the expected {expected[:12]}…")
        shutil.rmtree(tmp / "download", ignore_errors=True)
        _swap_in(staged, dest, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"adapter": dest / "adapter", "tokenizer": dest / "tokenizer"}


def _get_run(client: Any, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException for a missing run, others for a dead server
        raise ProviderError(
            f"MLflow run {run_id} is not in the tracking store {_safe_uri(client)} "
            f"({type(exc).__name__}: {str(exc)[:200]}); point settings.tracking_uri at the store that "
            "trained it, or train again with `llmops apply --replace finetunes.NAME`."
        ) from None


def _artifact_parts(client: Any, run: Any, dest: Path) -> dict[str, str]:
    """{"adapter": "model/artifacts/adapter", "tokenizer": ...}, read from the logged MLmodel."""
    import yaml

    run_id = run.info.run_id
    names = {a.path for a in client.list_artifacts(run_id, MODEL_ARTIFACT)}
    if f"{MODEL_ARTIFACT}/MLmodel" not in names:
        why = f"no MLflow model at artifact path `{MODEL_ARTIFACT}` (logged by an older llmops, or deleted)"
        raise _missing(client, run, why)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.mlmodel-", dir=_existing_parent(dest)) as tmp:
        local = client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/MLmodel", tmp)
        flavor = (yaml.safe_load(Path(local).read_text(encoding="utf-8")) or {}).get("flavors", {})
    saved = (flavor.get("python_function") or {}).get("artifacts") or {}
    parts = {}
    for name in ("adapter", "tokenizer"):
        rel = (saved.get(name) or {}).get("path")
        if not rel:
            raise _missing(client, run, f"its MLflow model has no `{name}` artifact")
        parts[name] = f"{MODEL_ARTIFACT}/{rel}"
    return parts


def _existing_parent(dest: Path) -> Path:
    parent = Path(dest).parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _swap_in(staged: Path, dest: Path, tmp: Path) -> None:
    """Rename `staged` to `dest`; an existing `dest` is moved into `tmp` first (and removed with it)."""
    import os

    if dest.exists():
        os.replace(dest, tmp / "old")
    os.replace(staged, dest)


def _missing(client: Any, run: Any, why: str) -> ProviderError:
    address = run.data.tags.get("llmops.address") or "finetunes.NAME"
    return ProviderError(
        f"MLflow run {run.info.run_id} on {_safe_uri(client)}: {why}. Train it again with "
        f"`llmops apply --replace {address}`."
    )


def _safe_uri(client: Any) -> str:
    """The client's tracking URI without its password."""
    from llmops.redact import redact_url

    return redact_url(str(getattr(client, "tracking_uri", "") or ""))

