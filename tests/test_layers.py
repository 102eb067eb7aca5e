"""Layering and startup: the core never imports the CLI; --help and validate stay light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "mlflow", "dvc", "matplotlib", "docker")

_PROBE = r"""
import importlib, json, pathlib, sys
import llmops
root = pathlib.Path(llmops.__file__).parent
culprits = {}
for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root.parent).with_suffix("")
    name = ".".join(p for p in rel.parts if p != "__init__")
    if name.startswith("llmops.cli") or name.endswith("__main__"):
        continue
    importlib.import_module(name)
    for ui in ("click", "rich", "llmops.cli"):
        if ui in sys.modules and ui not in culprits:
            culprits[ui] = name
print(json.dumps(culprits))
"""


def test_core_never_imports_the_cli_or_ui_libraries():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}


def _modules_after(args: list[str], cwd: Path) -> list[str]:
    code = (
        "import sys, json\n"
        "from llmops.cli.main import cli\n"
        "try:\n"
        f"    cli.main(args={args!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_heavy_library():
    assert _modules_after(["--help"], REPO) == []


def test_validate_imports_no_heavy_library():
    assert _modules_after(["validate", "-C", str(REPO / "example-project")], REPO) == []


def test_plan_without_refresh_imports_no_heavy_library():
    assert _modules_after(["plan", "--refresh=false", "-C", str(REPO / "example-project")], REPO) == []
