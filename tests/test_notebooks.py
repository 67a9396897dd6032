"""Every notebook under notebooks/ executes end to end in the small configuration, and
its executed copy (run on the real model by ``notebooks/execute.py``) is committed with
its outputs and static figures and linked from the README.

The notebooks are kept as jupytext percent-format ``.py`` sources; each is converted
with ``jupytext.read`` and executed with ``nbclient`` by ``notebooks/execute.py``'s
``execute_notebook``. The kernel is *the interpreter running pytest*: a throwaway
kernelspec (``argv = [sys.executable, -m, ipykernel_launcher, ...]``) is written into a
temporary folder and handed to the kernel manager, so neither a user-level ``python3``
kernelspec nor one of another environment can be picked up, and nothing needs
``jupyter kernelspec install`` (a fresh CI venv with ``ipykernel`` is enough). The kernel
gets ``ROPE_LEAK_NOTEBOOK_SMALL=1`` and the repository root on ``PYTHONPATH``, and runs
with the notebook's folder as working directory.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT = 600  # per cell


def _execute_module():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _execute_module()

# Output that each notebook must print (key results, in the small configuration).
EXPECTED = {
    "01_teaching_demo.py": ["STEP 1 [tiny]:", "STEP 2:", "STEP 3 [tiny]: max cross-prompt std at position 0: causal = 0.0,",
                            "STEP 4 [tiny]", "STEP 5 [tiny]: composition"],
    "02_head_explorer.py": ["HEAD: L", "HEAD RESULT:", "position-0 patch: sink score", "EFFECTS of L"],
    "03_reproduction.py": ["Table 1.", "Table 2.", "Table 3.", "Table 4.", "scores_ss", "REPORT:"],
}


def notebook_paths() -> list[Path]:
    return execute.notebook_paths()


def test_every_notebook_has_expectations():
    names = [p.name for p in notebook_paths()]
    assert len(names) >= 3, names
    assert sorted(EXPECTED) == names
    assert sorted(execute.SIZES) == names


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec folder whose only kernel is this interpreter."""
    return execute.write_kernel_spec(tmp_path_factory.mktemp("kernels"))


def text_outputs(nb) -> str:
    """All stream and text/plain outputs of an executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
    return "\n".join(parts)


def figure_count(nb) -> int:
    return sum("application/vnd.plotly.v1+json" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_executes(path, kernel_dir, tmp_path):
    pytest.importorskip("jupytext")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    env = {
        **os.environ,
        "ROPE_LEAK_NOTEBOOK_SMALL": "1",
        "ROPE_LEAK_NOTEBOOK_OUT": str(tmp_path / "out"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    for key in ("ROPE_LEAK_NOTEBOOK_MODEL", "ROPE_LEAK_NOTEBOOK_PROMPTS", "ROPE_LEAK_NOTEBOOK_TOKENS",
                "ROPE_LEAK_HEAD"):
        env.pop(key, None)
    # raises CellExecutionError on any error in any cell
    nb = execute.execute_notebook(path, env, kernel_dir, timeout=TIMEOUT,
                                  extra_cells=('import sys; print("KERNEL:", sys.executable)',))

    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    text = text_outputs(nb)
    assert f"KERNEL: {sys.executable}" in text, "the notebook ran in another interpreter"
    for expected in EXPECTED[path.name]:
        assert expected in text, f"{path.name}: missing output {expected!r}"
    assert figure_count(nb) >= 2, f"{path.name}: expected plotly figures in the outputs"
    if path.name == "03_reproduction.py":
        assert (tmp_path / "out" / "report.html").exists()
        assert (tmp_path / "out" / "bos_interventions.csv").exists()


# -- the executed copies ------------------------------------------------------------------------
PRIVATE = re.compile(r"(?:from\s+rope_leak\S*\s+import\s+[^\n]*\b_\w+)|(?:\b(?:rl|explore|plots|plots_sinks)\._\w+)")


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_sources_use_the_public_api(path):
    source = path.read_text()
    assert "import rope_leak as rl" in source
    assert not PRIVATE.search(source), PRIVATE.search(source)
    assert "re.match" not in source and "re.fullmatch" not in source and "import re\n" not in source


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_executed_copy_is_committed_with_outputs_and_static_figures(path):
    nbformat = pytest.importorskip("nbformat")
    jupytext = pytest.importorskip("jupytext")
    executed = execute.EXECUTED / f"{path.stem}.ipynb"
    assert executed.exists(), f"run `python notebooks/execute.py {path.name}`"
    nb = nbformat.read(executed, as_version=4)
    source_cells = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    executed_cells = [c for c in nb.cells if c.cell_type == "code"]
    # the executed copy is of the current source, every code cell ran and nothing failed
    assert [c.source for c in executed_cells] == source_cells, f"{executed.name} is stale: rerun execute.py"
    assert all(c.get("execution_count") for c in executed_cells)
    outputs = [o for c in executed_cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert nb.metadata["rope_leak"]["source"] == path.name
    # the real model, not the tests' tiny one
    assert "'small': False" in text_outputs(nb) and "'real_model': True" in text_outputs(nb)
    figures = [o for o in outputs if execute.PLOTLY in o.get("data", {})]
    assert len(figures) >= 2
    for k, output in enumerate(figures, 1):
        png = base64.b64decode(output["data"]["image/png"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (execute.EXECUTED / "figures" / f"{path.stem}_{k:02d}.png").read_bytes() == png
    assert executed.stat().st_size < 4_000_000


def test_executed_notebooks_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    for path in notebook_paths():
        link = f"notebooks/executed/{path.stem}.ipynb"
        assert f"]({link})" in section, f"README's Notebooks section does not link {link}"
    total = sum(p.stat().st_size for p in execute.EXECUTED.rglob("*") if p.is_file())
    assert total < 8_000_000, f"executed notebooks and figures take {total / 1e6:.1f} MB"
