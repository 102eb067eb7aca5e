"""`python -m llmops.data.stage SPEC_JSON`: prepare one dataset as a DVC stage runs it.

The spec file is written by `llmops.providers.datasets`; relative paths in it are relative
to the current folder (DVC runs stages from the project root). It holds:
  name, source, format, prepare (normalized steps),
  output_dir (gets train.jsonl, eval.jsonl when a split step exists, profile.json),
  report_dir (gets profile.json, index.html, length-*.svg),
  error_file (optional: where a failure's message is written for the provider to read).
Exit status 0 on success; 1 with one line on stderr (and in error_file) on bad data or spec.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llmops.errors import LlmopsError

SPEC_VERSION = 1


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a stage spec file."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmopsError(f"{path}: stage spec not found; run `llmops apply` to write it.") from None
    except json.JSONDecodeError as exc:
        raise LlmopsError(f"{path}:{exc.lineno}: malformed stage spec ({exc.msg}); run `llmops apply` to rewrite it.") from None
    missing = [k for k in ("name", "source", "output_dir", "report_dir") if not isinstance(spec.get(k), str)]
    if not isinstance(spec, dict) or missing:
        raise LlmopsError(f"{path}: stage spec lacks {', '.join(missing) or 'an object'}; run `llmops apply` to rewrite it.")
    if spec.get("spec_version", SPEC_VERSION) > SPEC_VERSION:
        raise LlmopsError(f"{path}: written by a newer llmops (spec_version {spec['spec_version']}); upgrade llmops.")
    return spec


PROVENANCE = "_source"  # with `sources:`, each row's file; fields starting with "_" are never model text


def run_stage(spec: dict[str, Any], base: Path) -> dict[str, Any]:
    """Prepare the dataset described by `spec` (paths relative to `base`); return the profile."""
    from llmops.data.io import detect_format, read_rows, write_jsonl
    from llmops.fsutil import atomic_write_text
    from llmops.data.profile import build_profile
    from llmops.data.report import write_report
    from llmops.data.steps import normalize_steps, run_steps

    fmt = detect_format(spec["source"], spec.get("format"))
    steps = normalize_steps(spec.get("prepare"))
    sources = spec.get("sources")
    if isinstance(sources, list) and sources:
        rows, counts = [], []
        for src in sources:
            part = read_rows(base / src["path"], src.get("format") or detect_format(src["path"], None))
            rows += [{**row, PROVENANCE: src["path"]} for row in part]
            counts.append({"path": src["path"], "format": src.get("format"), "rows": len(part)})
    else:
        rows, counts = read_rows(base / spec["source"], fmt), None
    result = run_steps(rows, steps)
    out_dir = base / spec["output_dir"]
    for split, split_rows in result.splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", split_rows)
    if "eval" not in result.splits:
        (out_dir / "eval.jsonl").unlink(missing_ok=True)
    shown = " + ".join(c["path"] for c in counts) if counts else spec["source"]
    profile = build_profile(spec["name"], shown, fmt, len(rows), result.steps, result.splits)
    if counts:
        profile["sources"] = counts
    write_report(base / spec["report_dir"], profile, result.splits)
    text = json.dumps(profile, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(out_dir / "profile.json", text)
    return profile


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m llmops.data.stage SPEC_JSON\n")
        return 2
    spec_path = Path(args[0])
    error_file: Path | None = None
    name = spec_path.parent.name
    try:
        spec = load_spec(spec_path)
        name = spec["name"]
        error_file = Path(spec["error_file"]) if isinstance(spec.get("error_file"), str) else None
        if error_file is not None:
            error_file.unlink(missing_ok=True)
        run_stage(spec, Path.cwd())
    except LlmopsError as exc:
        message = f"datasets.{name}: {exc.message}"
        if error_file is not None:
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(message + "\n", encoding="utf-8")
        sys.stderr.write(f"error: {message}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
