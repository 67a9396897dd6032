"""Execute the notebook sources and keep the executed copies, readable without running.

    python notebooks/execute.py                      # every notebook, the sizes below
    python notebooks/execute.py 02_head_explorer.py  # one notebook

Each ``NN_name.py`` (jupytext percent format) is converted with ``jupytext.read``,
executed with ``nbclient`` in a kernel that is this interpreter, and written to
``executed/NN_name.ipynb``. Plotly figures do not render in static viewers (GitHub, a
file browser), so every figure is also rendered to ``executed/figures/NN_k.png`` with
headless Chromium and the PNG is put into the same output beside the plotly data. The
tests (``tests/test_notebooks.py``) execute the sources with the same function in the
small configuration.

Environment: ``ROPE_LEAK_NOTEBOOK_*`` variables set here win over :data:`SIZES`;
``CHROMIUM`` names the browser binary (default: ``chromium`` on the PATH).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXECUTED = HERE / "executed"
KERNEL_NAME = "rope-leak-notebook-python"
PLOTLY = "application/vnd.plotly.v1+json"
FIGURE_SIZE = (1000, 600)  # pixels, for figures without their own size

#: The sizes of the committed executed notebooks (SmolLM2-135M, Wikipedia chunks). They are
#: smaller than the notebooks' defaults so that all three run in minutes on a 2-core CPU.
SIZES = {
    "01_teaching_demo.py": {"ROPE_LEAK_NOTEBOOK_PROMPTS": "16", "ROPE_LEAK_NOTEBOOK_TOKENS": "128"},
    "02_head_explorer.py": {"ROPE_LEAK_NOTEBOOK_PROMPTS": "16", "ROPE_LEAK_NOTEBOOK_TOKENS": "64"},
    "03_reproduction.py": {"ROPE_LEAK_NOTEBOOK_PROMPTS": "16", "ROPE_LEAK_NOTEBOOK_TOKENS": "128"},
}


def notebook_paths() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def write_kernel_spec(folder: Path) -> Path:
    """A kernelspec folder whose only kernel is this interpreter (no user-level kernelspec
    of another environment can be picked up; nothing needs ``jupyter kernelspec install``)."""
    spec = folder / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"rope_leak ({sys.executable})",
        "language": "python",
        "metadata": {"debugger": False},
    }))
    return folder


def execute_notebook(path: Path, env: dict[str, str], kernel_dir: Path, timeout: int = 1800,
                     extra_cells: tuple[str, ...] = ()):
    """Execute one notebook source (cell errors raise ``CellExecutionError``); returns the
    executed ``nbformat`` notebook. The kernel runs with the notebook's folder as working
    directory and the repository root first on ``PYTHONPATH``."""
    import jupytext
    import nbclient
    import nbformat
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    nb = jupytext.read(path)
    for source in extra_cells:
        nb.cells.append(nbformat.v4.new_code_cell(source))
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}
    km = KernelManager(kernel_name=KERNEL_NAME,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=timeout, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return nb


def render_png(figure_json: dict, png: Path, browser: str) -> None:
    """Render one plotly figure (its JSON) to ``png`` with headless Chromium."""
    import plotly.io as pio

    fig = pio.from_json(json.dumps(figure_json))
    width = int(fig.layout.width or FIGURE_SIZE[0])
    height = int(fig.layout.height or FIGURE_SIZE[1])
    fig.update_layout(width=width, height=height)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
        shot = Path(tmp) / "figure.png"
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000",
             f"--screenshot={shot}", f"--window-size={width + 20},{height + 20}", page.as_uri()],
            capture_output=True, text=True, timeout=180)
        if not shot.exists():
            raise RuntimeError(f"{browser} wrote no screenshot of {png.name}: {proc.stderr[-1000:]}. "
                               "Fix: install chromium, or set CHROMIUM to a Chrome/Chromium binary.")
        shutil.move(shot, png)


def drop_plotly_loader(nb) -> None:
    """Remove the outputs that only load plotly.js into a live page (the ``notebook``
    renderer's first output, ~5 MB of library code, no result)."""
    for cell in nb.cells:
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if not (
                set(o.get("data", {})) == {"text/html"} and len(o["data"]["text/html"]) > 100_000
                and "plotly" in o["data"]["text/html"])]


def add_static_figures(nb, stem: str, figures: Path, browser: str) -> list[Path]:
    """Put a PNG beside every plotly figure of ``nb`` (and keep it in ``figures``)."""
    written = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY not in data:
                continue
            png = figures / f"{stem}_{len(written) + 1:02d}.png"
            render_png(data[PLOTLY], png, browser)
            data["image/png"] = base64.b64encode(png.read_bytes()).decode()
            data.pop("text/html", None)  # a script-only div: blank without JavaScript
            written.append(png)
    return written


def main(names: list[str]) -> int:
    import nbformat

    browser = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("no chromium found. Fix: install chromium, or set CHROMIUM to its path.")
    paths = [HERE / n for n in names] if names else notebook_paths()
    figures = EXECUTED / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kernel_dir = write_kernel_spec(Path(tmp) / "kernels")
        for path in paths:
            env = {**os.environ, **{k: v for k, v in SIZES.get(path.name, {}).items() if k not in os.environ}}
            env.pop("ROPE_LEAK_NOTEBOOK_SMALL", None)
            env.setdefault("ROPE_LEAK_NOTEBOOK_OUT", str(Path(tmp) / f"{path.stem}_out"))
            print(f"executing {path.name} ...", file=sys.stderr)
            nb = execute_notebook(path, env, kernel_dir)
            for old in figures.glob(f"{path.stem}_*.png"):
                old.unlink()
            drop_plotly_loader(nb)
            pngs = add_static_figures(nb, path.stem, figures, browser)
            nb.metadata["rope_leak"] = {"source": path.name,
                                        "sizes": {k: env.get(k) for k in SIZES.get(path.name, {})}}
            target = EXECUTED / f"{path.stem}.ipynb"
            nbformat.write(nb, target)
            print(f"wrote {target.relative_to(ROOT)} and {len(pngs)} figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
