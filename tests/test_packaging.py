"""The package as pip installs it: a small core, extras for the rest, no top-level `calibration`, ruff clean."""

import ast
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "transformers", "safetensors", "huggingface-hub"}


def test_core_install_needs_only_what_generation_needs():
    requirements = [Requirement(line) for line in importlib.metadata.requires("kvcompress")]
    core = {req.name.replace("_", "-").lower() for req in requirements if req.marker is None}
    assert core == CORE
    extras = importlib.metadata.metadata("kvcompress").get_all("Provides-Extra")
    assert {"default-model", "calibration", "test"} <= set(extras)


def test_no_top_level_calibration_module():
    assert importlib.util.find_spec("kvcompress.calibration") is not None
    code = "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; print(importlib.util.find_spec('calibration'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.strip() == "None"


def test_generation_imports_no_optional_dependency():
    code = "import sys, kvcompress, kvcompress.calibration.cli; print(sorted(m for m in ('matplotlib', 'datasets', 'gguf') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_extra_names_what_to_install(monkeypatch):
    from kvcompress.extras import require

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "kvcompress\[calibration\]"'):
        require("matplotlib", "calibration", "Plotting results")


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra"
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_benchmarks_build_artifacts_through_the_public_api():
    """Benchmarks measure the library as a user has it: they import nothing from calibration (but the ablation of the
    recall statements, which calibrates through `kvcompress.calibrate` with each set of them)."""
    for script in sorted(set((ROOT / "benchmarks").glob("*.py")) - {ROOT / "benchmarks" / "recall_wordings.py"}):
        imported = set()
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        assert not {name for name in imported if name.startswith("kvcompress.calibration")}, script.name
