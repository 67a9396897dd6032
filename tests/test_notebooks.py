"""Every notebook under notebooks/ executes end to end in the small configuration.

The notebooks are kept as jupytext percent-format ``.py`` sources; each is converted
with ``jupytext.read`` and executed with ``nbclient``. The kernel is *the interpreter
running pytest*: a throwaway kernelspec (``argv = [sys.executable, -m,
ipykernel_launcher, ...]``) is written into a temporary folder and handed to the
kernel manager, so neither a user-level ``python3`` kernelspec nor one of another
environment can be picked up, and nothing needs ``jupyter kernelspec install``
(a fresh CI venv with ``ipykernel`` is enough). The kernel gets
``ROPE_LEAK_NOTEBOOK_SMALL=1`` and the repository root on ``PYTHONPATH``, and runs with
the notebook's folder as working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "rope-leak-test-python"
TIMEOUT = 600  # per cell

# Output that each notebook must print (key results, in the small configuration).
EXPECTED = {
    "01_teaching_demo.py": ["STEP 1 [tiny]:", "STEP 2:", "STEP 3 [tiny]: max cross-prompt std at position 0: causal = 0.0,",
                            "STEP 4 [tiny]", "STEP 5 [tiny]: composition"],
    "02_head_explorer.py": ["HEAD: L", "HEAD RESULT:", "position-0 patch: sink score"],
    "03_reproduction.py": ["Table 1.", "Table 2.", "Table 3.", "Table 4.", "scores_ss", "REPORT:"],
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_every_notebook_has_expectations():
    names = [p.name for p in notebook_paths()]
    assert len(names) >= 3, names
    assert sorted(EXPECTED) == names


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec folder whose only kernel is this interpreter."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec = kernels / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"rope_leak tests ({sys.executable})",
        "language": "python",
        "metadata": {"debugger": False},
    }))
    return kernels


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
    nb = jupytext.read(path)
    nb.cells.append(nbformat.v4.new_code_cell('import sys; print("KERNEL:", sys.executable)'))
    env = {
        **os.environ,
        "ROPE_LEAK_NOTEBOOK_SMALL": "1",
        "ROPE_LEAK_NOTEBOOK_OUT": str(tmp_path / "out"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    for key in ("ROPE_LEAK_NOTEBOOK_MODEL", "ROPE_LEAK_NOTEBOOK_PROMPTS", "ROPE_LEAK_NOTEBOOK_TOKENS",
                "ROPE_LEAK_HEAD"):
        env.pop(key, None)
    km = KernelManager(kernel_name=KERNEL_NAME,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(
        nb, km=km, timeout=TIMEOUT, kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=env)  # raises CellExecutionError on any error in any cell

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
