"""The documentation site, API reference included, builds from the docstrings with every
warning an error (``mkdocs build --strict``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "remove_start_cut" in (tmp_path / "site" / "api" / "interventions" / "index.html").read_text()
    assert 'id="rope_leak.analyze"' in reference  # the docstrings are rendered, not just the pages
