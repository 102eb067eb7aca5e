"""Embedding drift: a local transformers encoder, the cached training side, and the score.

- `TransformersEmbedder(folder)`: texts -> L2-normalised mean of the last hidden state over
  the attention mask (AutoModel + AutoTokenizer, local files only; CUDA when available,
  else CPU; batched, under `torch.no_grad`). Any saved encoder works (a sentence-transformers
  checkpoint's transformer folder, or a causal LM such as the fine-tune's base model).
- `model_dir(root, value, base_model_dir, where)`: the folder `drift.embedding_model` names;
  `base_model` means the deployed fine-tune's base model (resolved from llmops.lock by
  `llmops.monitor.run`).
- `training_sample(rows)`: a seeded sample (up to `SAMPLE_SIZE`) of the training prompts.
- `embedding_drift(embed, train_texts, window_texts, cache_dir, name)`: 1 - cosine similarity
  of the mean training embedding and the mean window embedding, with a noise floor: the same
  distance between two disjoint random halves of the training sample, each the window's size
  (at most half the sample), averaged over `NOISE_SPLITS` seeded splits. In-distribution
  traffic scores around the floor.

The training side's embeddings are cached as `.npy` files under `.llmops/monitor/embeddings/`,
keyed by the embedder's `cache_key` (model files, pooling, max length) and the digest of the
sampled texts, so a repeated `llmops monitor` embeds only the window. An `embed` callable
without `cache_key` is not cached. torch and transformers are imported only when a model loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from llmops.fsutil import atomic_write_bytes
from llmops.monitor.drift import row_text
from llmops.monitor.errors import MonitorError

BASE_MODEL = "base_model"
SAMPLE_SIZE = 1000
SAMPLE_SEED = 13
NOISE_SPLITS = 5
POOLING = "mean-last-hidden-state/l2/v1"  # part of the cache key: bump when embeddings change
CACHE_DIR = Path(".llmops") / "monitor" / "embeddings"
HASH_CACHE = Path(".llmops") / "cache" / "file-hashes.json"
Embed = Callable[[list[str]], Any]


class TransformersEmbedder:
    """Sentence embeddings from a saved transformers model folder (loaded on first use).

    `texts_embedded` counts the texts encoded so far (cache hits do not add to it).
    `cache_key` identifies what the embeddings depend on: the model's files (sha256, remembered
    by size and mtime in `hash_cache`), the pooling and `max_length`.
    """

    def __init__(self, folder: Path | str, *, where: str = "drift.embedding_model", batch_size: int = 32,
                 max_length: int = 512, device: str | None = None, hash_cache: Path | None = None) -> None:
        self.folder = Path(folder)
        self.where = where
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.hash_cache = hash_cache
        self.texts_embedded = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._key: str | None = None
        if not (self.folder / "config.json").is_file():
            raise MonitorError(f"{where}: {self.folder} holds no saved transformers model (no config.json); "
                               "point it at a folder written by `save_pretrained`, or use `base_model`.")

    @property
    def cache_key(self) -> str:
        if self._key is None:
            files = _hash_folder(self.folder, self.hash_cache)
            blob = json.dumps({"files": files, "pooling": POOLING, "max_length": self.max_length}, sort_keys=True)
            self._key = hashlib.sha256(blob.encode()).hexdigest()
        return self._key

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        model, tokenizer, max_length = self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out: np.ndarray | None = None  # sized by the first batch: configs name the width differently
        device = next(model.parameters()).device
        step = self.batch_size if tokenizer.pad_token is not None else 1
        with torch.no_grad():
            for i in range(0, len(order), step):
                idx = order[i:i + step]
                batch = tokenizer([texts[j] or " " for j in idx], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt").to(device)
                result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                hidden = result.last_hidden_state.float()  # pool in float32: fp16 sums overflow on long texts
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                if out is None:
                    out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
                out[idx] = pooled.cpu().numpy()
        self.texts_embedded += len(texts)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def _load(self) -> tuple[Any, Any, int]:
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # a causal LM's unused lm_head is reported as a warning
            hf_logging.disable_progress_bar()  # library code never draws on the terminal
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
                dtype = "auto" if device.startswith("cuda") else torch.float32
                model = AutoModel.from_pretrained(str(self.folder), local_files_only=True, dtype=dtype)
            except (OSError, ValueError, KeyError) as exc:
                raise MonitorError(f"{self.where}: cannot load the embedding model in {self.folder} ({exc}); "
                                   "it must hold a transformers model and its tokenizer.") from None
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
            if tokenizer.pad_token is None and (tokenizer.eos_token or tokenizer.unk_token):
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            tokenizer.padding_side = "right"
            self._model, self._tokenizer = model.to(device).eval(), tokenizer
        limits = [self.max_length, getattr(self._model.config, "max_position_embeddings", None),
                  getattr(self._tokenizer, "model_max_length", None)]
        return self._model, self._tokenizer, min(int(x) for x in limits if isinstance(x, int) and x > 0)


def _hash_folder(folder: Path, hash_cache: Path | None) -> dict[str, str]:
    """sha256 of the model's files; with `hash_cache`, re-read only files whose size or mtime changed."""
    if hash_cache is None:
        from llmops.hashing import folder_hashes

        return folder_hashes(folder)
    from llmops.providers.base_models import FileHashCache

    return FileHashCache(hash_cache).hash_folder(folder)


def model_dir(root: Path, value: str, base_model_dir: Path | None, where: str) -> Path:
    """The model folder `drift.embedding_model` names: project-relative, or the base model's."""
    if value == BASE_MODEL:
        if base_model_dir is None:
            raise MonitorError(f"{where}: `base_model` needs the deployment's fine-tune and its base model in "
                               "llmops.lock; run `llmops apply`, or name a model folder instead.")
        folder = Path(base_model_dir)
    else:
        folder = Path(value) if Path(value).is_absolute() else Path(root) / value
    if not folder.is_dir():
        raise MonitorError(f"{where}: model folder {folder} does not exist; save an embedding model there "
                           "(`save_pretrained`) or fix the path in llmops.yaml.")
    return folder


def load_embedder(root: Path, value: str, base_model_dir: Path | None, where: str) -> TransformersEmbedder:
    """A `TransformersEmbedder` for `drift.embedding_model`, its file hashes cached under `root`."""
    folder = model_dir(root, value, base_model_dir, where)
    return TransformersEmbedder(folder, where=where, hash_cache=Path(root) / HASH_CACHE)


def training_sample(rows: Sequence[dict[str, Any]], limit: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> list[str]:
    """Up to `limit` training prompts (see `drift.row_text`), a seeded sample in row order."""
    idx: Sequence[int] = range(len(rows))
    if len(rows) > limit:
        idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [row_text(rows[i]) for i in idx]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity (0 for a zero vector, which has no direction to compare)."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 0.0 if norm == 0.0 else float(1.0 - float(a @ b) / norm)


def noise_floor(reference: np.ndarray, size: int, splits: int = NOISE_SPLITS, seed: int = SAMPLE_SEED) -> float | None:
    """Mean distance between the means of two disjoint random `size`-row halves of `reference`."""
    size = min(size, reference.shape[0] // 2)
    if size < 1:
        return None
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(splits):
        perm = rng.permutation(reference.shape[0])
        out.append(cosine_distance(reference[perm[:size]].mean(axis=0), reference[perm[size:2 * size]].mean(axis=0)))
    return float(np.mean(out))


def _as_matrix(value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise MonitorError(f"the embedding function returned shape {arr.shape} for {n} texts; it must return "
                           "one vector per text (n, dim).")
    return arr


def reference_embeddings(embed: Embed, texts: list[str], cache_dir: Path | None, name: str) -> tuple[np.ndarray, str]:
    """Embeddings of the training sample and where they came from: `hit`, `miss` or `off`."""
    key = getattr(embed, "cache_key", None)
    if cache_dir is None or not key:
        return _as_matrix(embed(texts), len(texts)), "off"
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    path = Path(cache_dir) / f"{stem}-{hashlib.sha256(f'{key}:{digest}'.encode()).hexdigest()[:32]}.npy"
    try:
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 2 and arr.shape[0] == len(texts):
            return arr.astype(np.float64), "hit"
    except (OSError, ValueError):
        pass  # missing or unreadable: embed again
    arr = _as_matrix(embed(texts), len(texts))
    _save(path, arr.astype(np.float32))
    return arr, "miss"


def _save(path: Path, arr: np.ndarray) -> None:
    """Write atomically, then drop this monitor's older entries (other models or training data)."""
    try:
        buffer = io.BytesIO()
        np.save(buffer, arr, allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(f"{prefix}*.npy"):
            if old != path and re.fullmatch(re.escape(prefix) + r"[0-9a-f]{32}\.npy", old.name):
                old.unlink(missing_ok=True)
    except OSError:
        pass  # the cache only saves time; never fail a monitor run on it


def embedding_drift(embed: Embed, train_texts: list[str], window_texts: list[str], *,
                    cache_dir: Path | None = None, name: str = "monitor") -> dict[str, Any]:
    """The `drift.embedding` section of a report (status `ok`): distance, noise floor, counts."""
    reference, cache = reference_embeddings(embed, train_texts, cache_dir, name)
    window = _as_matrix(embed(window_texts), len(window_texts))
    floor = noise_floor(reference, len(window_texts))
    return {"status": "ok",
            "cosine_distance": round(cosine_distance(reference.mean(axis=0), window.mean(axis=0)), 6),
            "noise_floor": None if floor is None else round(floor, 6),
            "requests": len(window_texts), "reference_texts": len(train_texts), "cache": cache}
