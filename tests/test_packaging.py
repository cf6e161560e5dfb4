"""The installed package finds its schema files, and `import tracekit` stays light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_pull_torch_transformers_or_vtk() -> None:
    code = ("import sys, tracekit, tracekit.cli, tracekit.reader, tracekit.writer; "
            "heavy = [m for m in ('torch', 'transformers', 'vtk', 'pyvista') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_schema_files_ship_in_the_checkout_layout() -> None:
    from tracekit.schema import load_schema, schema_path, spec_path

    assert schema_path().read_text(encoding="utf-8") == (
        ROOT / "schemas" / "trace-v1.1.schema.json").read_text(encoding="utf-8")
    assert "MUST" in spec_path().read_text(encoding="utf-8")
    assert load_schema()["additionalProperties"] is False


@pytest.mark.slow
def test_schema_files_ship_in_the_wheel(tmp_path: Path) -> None:
    """Build a wheel, unpack it alone on sys.path, and load the schema from it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("tracekit-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert "tracekit/schemas/trace-v1.0.schema.json" in names
    assert "tracekit/schemas/trace-v1.1.schema.json" in names
    assert "tracekit/schemas/trace-v1.1.md" in names
    assert "tracekit/schemas/trace-v1.0.md" in names
    assert "tracekit/recorder/recording.py" in names
    assert "tracekit/demo_model/model.safetensors" in names
    code = ("import tracekit, tracekit.schema as s; "
            f"assert tracekit.__file__.startswith({str(site)!r}), tracekit.__file__; "
            "print(s.load_schema()['title'])")
    # -S: no site processing, so the editable install's path hook stays out; dependencies
    # come from site-packages, placed after the unpacked wheel.
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{site}:{deps}", "PATH": "/usr/bin:/bin"},
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "tracekit trace metadata, format 1.1"
