"""Write an analysis to an output folder: JSON, CSV tables, statistics, HTML report.

``results.json`` holds only what the inputs determine (settings, provenance, numbers),
sorted and without timestamps, so the same inputs and seed give a byte-identical file;
timings go to ``run_info.json``. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from rope_leak.analysis import Analysis
from rope_leak.cache import atomic_write_text

RESULT_FILES = ("results.json", "heads.csv", "layers.csv", "statistics.npz", "report.html")


class OutputExistsError(FileExistsError):
    """The output folder already holds results."""


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("rope_leak", "transformer-lens", "torch", "transformers", "numpy", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    if out["rope_leak"] == "not installed":
        from rope_leak import __version__

        out["rope_leak"] = __version__
    out["python"] = platform.python_version()
    return out


def to_jsonable(value):
    """Numpy/pandas values to plain JSON; NaN and inf become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file. Fix: name a folder.")
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already holds results ({', '.join(existing)}). Fix: choose another --out "
            "folder, or pass --overwrite to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def results_dict(analysis: Analysis, provenance: dict | None = None) -> dict:
    heads = analysis.heads()
    return to_jsonable({
        "rope_leak_results": 1,
        "provenance": {"versions": package_versions(), **(provenance or {})},
        "metadata": analysis.statistics.metadata,
        "summary": analysis.summary(),
        "layers": {t: analysis.layers(t).to_dict(orient="list") for t in analysis.targets},
        "heads": heads.to_dict(orient="list"),
        "position_zero": analysis.position_zero(),
        "diagnostics": analysis.diagnostics().to_dict(orient="records"),
    })


def save_analysis(
    analysis: Analysis,
    out_dir: str | Path,
    *,
    provenance: dict | None = None,
    run_info: dict | None = None,
    overwrite: bool = False,
    report: bool = True,
) -> Path:
    """Write every result file of ``analysis`` into ``out_dir`` (atomically, file by file)."""
    out = check_output_dir(out_dir, overwrite)
    payload = results_dict(analysis, provenance)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "heads.csv", analysis.heads().to_csv(index=False, float_format="%.6g"))
    layers = [analysis.layers(t) for t in analysis.targets]
    import pandas as pd

    atomic_write_text(out / "layers.csv", pd.concat(layers).to_csv(index=False, float_format="%.6g"))
    analysis.statistics.save(out / "statistics.npz")
    if run_info is not None:
        atomic_write_text(out / "run_info.json", json.dumps(to_jsonable(run_info), indent=1, sort_keys=True))
    if report:
        from rope_leak.report import write_report

        write_report(analysis, out / "report.html", provenance=payload["provenance"], run_info=run_info)
    return out
