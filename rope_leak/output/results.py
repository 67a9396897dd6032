"""Write an analysis to an output folder: JSON, CSV tables, statistics, HTML report.

``results.json`` holds only what the inputs determine (settings, provenance, numbers),
sorted and without timestamps, so the same inputs and seed give a byte-identical file;
timings go to ``run_info.json``. Every file is first written into a hidden staging folder
inside the output folder and only renamed into place once all of them are complete
(``results.json`` last), so an error or an interrupt never leaves a partial set of results.
The renames are journaled (:func:`rope_leak.download_cache.staged_files`): a process
killed even among them leaves the earlier results, which the next write or check of the
folder (:func:`check_output_dir`) restores exactly, and a rerun then writes what an
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from rope_leak.download_cache import (
    atomic_write_text,
    folder_lock,
    recover_staged,
    remove_stale_writes,
    staged_files,
)
from rope_leak.output.records import AnalysisRecord, as_analysis_record, as_sink_record
from rope_leak.version import __version__

RESULT_FILES = ("results.json", "heads.csv", "layers.csv", "statistics.npz", "report.html")
SINK_FILES = ("sinks.json", "sink_heads.csv", "trajectory.csv", "probe.csv",
              "bos_interventions.csv", "sinks.html")
STAGING_PREFIX = ".rope_leak_staging."


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
        out["rope_leak"] = __version__
    out["python"] = platform.python_version()
    return out


def to_jsonable(value):
    """Numpy/pandas values to plain JSON; NaN and inf become None (strict JSON), other
    objects their text."""
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
    if value is None or isinstance(value, str):
        return value
    return str(value)  # paths, dtypes and other objects: as text


def recover_output_dir(out_dir: str | Path, files: Sequence[str] = RESULT_FILES) -> Path:
    """Undo what a process killed while writing into ``out_dir`` left (a staged write it
    had begun to commit is rolled back, its staging folder and the temporaries of
    ``files``, ``run_info.json`` and ``checkpoint.npz`` removed), so the folder holds
    exactly its earlier files."""
    out = Path(out_dir)
    if out.is_dir():
        with folder_lock(out):
            recover_staged(out, STAGING_PREFIX)
            # checkpoint.npz: only ever written while a run is under way, never during a check
            remove_stale_writes(out, (*files, "run_info.json", "checkpoint.npz"))
    return out


def check_output_dir(out_dir: str | Path, overwrite: bool = False, files: Sequence[str] = RESULT_FILES) -> Path:
    """Make ``out_dir`` if needed; refuse (unless ``overwrite``) when it holds any of ``files``.
    First undoes what a killed writer left there (:func:`recover_output_dir`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file. Fix: name a folder.")
    recover_output_dir(out, files)
    existing = [name for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already holds results ({', '.join(existing)}). Fix: choose another --out "
            "folder, or pass --overwrite to replace them."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _provenance(record: AnalysisRecord, provenance: dict | None) -> dict:
    """Versions, the caller's provenance, and the model fingerprint the analysis recorded
    (it fills what the caller left out or None)."""
    out = {"versions": package_versions(), **(provenance or {})}
    if record.model:
        given = dict(out.get("model") or {})
        out["model"] = {**given, **{k: v for k, v in record.model.items() if given.get(k) is None}}
    return out


def results_dict(analysis, provenance: dict | None = None) -> dict:
    """``results.json``'s content for an :class:`AnalysisRecord` (or an analysis)."""
    record = as_analysis_record(analysis)
    return to_jsonable({
        "rope_leak_results": 1,
        "provenance": _provenance(record, provenance),
        "analysis": record.settings,
        "metadata": record.metadata,
        "summary": record.summary,
        "layers": {t: record.layer_table(t).to_dict(orient="list") for t in record.targets},
        "heads": record.heads.to_dict(orient="list"),
        "position_zero": record.position_zero,
        "diagnostics": record.diagnostics.to_dict(orient="records"),
    })


def _csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, float_format="%.17g")  # full float64 precision


def save_analysis(
    analysis,
    out_dir: str | Path,
    *,
    provenance: dict | None = None,
    run_info: dict | None = None,
    overwrite: bool = False,
    report: bool = True,
    extra_sections: Sequence[str] = (),
    statistics: bool = True,
    sinks=None,
    extra_files: Mapping[str, str] | None = None,
    extra_writer: Callable[[Path], object] | None = None,
    replaces: Sequence[str] = (),
) -> Path:
    """Write every result file of ``analysis`` (an :class:`AnalysisRecord`, or an analysis,
    whose record is taken) into ``out_dir``.

    All files are written into a hidden staging folder inside ``out_dir`` first; only when
    every one is complete are they renamed into place, ``results.json`` last. An error or
    interrupt while writing leaves ``out_dir`` as it was (no partial results, no
    temporary files). With ``overwrite=True`` result files of an earlier run that this
    run does not write (e.g. ``report.html`` with ``report=False``) are removed, so the
    folder never mixes two runs. ``sinks``: the run's sink analysis (or its
    :class:`SinkRecord`), for the report's sink-reading flags.
    ``extra_files``: ``{file name: text}`` written with the results (e.g. ``effects.csv``).
    ``extra_writer``: called with the staging folder to write more files there (e.g.
    ``lambda folder: save_sinks(result, folder, overwrite=True)``), committed with the rest.
    ``replaces``: more file names this write owns (e.g. the sink files, ``checkpoint.npz``):
    any left from an earlier run and not written now is removed in the same commit.

    The commit is journaled: a process killed at any moment (SIGKILL included) leaves the
    earlier results, or the new ones complete, once the next write or check of
    ``out_dir`` (:func:`check_output_dir`) has run; until then a killed commit's hidden
    ``.rope_leak_staging.*`` folder holds what is needed to undo it.
    """
    record = as_analysis_record(analysis)
    if statistics and record.statistics is None:
        raise ValueError("this record holds no statistics to save. Fix: pass statistics=False, "
                         "or the record of analysis.record() with its statistics.")
    out = check_output_dir(out_dir, overwrite)
    payload = results_dict(record, provenance)
    owned = (*RESULT_FILES, "run_info.json", *replaces)
    with staged_files(out, prefix=STAGING_PREFIX, last="results.json", owned=owned) as staging:
        atomic_write_text(staging / "heads.csv", _csv(record.heads))
        atomic_write_text(staging / "layers.csv", _csv(record.layers))
        for name, text in (extra_files or {}).items():
            atomic_write_text(staging / name, text)
        if statistics:  # mergeable; tens of MB for SmolLM2 at 64 x 256 (more with cell maps)
            record.statistics.save(staging / "statistics.npz")
        if run_info is not None:
            atomic_write_text(staging / "run_info.json",
                              json.dumps(to_jsonable(run_info), indent=1, sort_keys=True))
        if report:
            from rope_leak.output.report import (
                write_report,  # deferred: plotly takes ~1 s to import
            )

            write_report(record, staging / "report.html", provenance=payload["provenance"],
                         run_info=run_info, extra_sections=extra_sections, sinks=as_sink_record(sinks))
        if extra_writer is not None:
            extra_writer(staging)
        atomic_write_text(staging / "results.json", json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return out


def save_sinks(sinks, out_dir: str | Path, *, provenance: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write the sink result files (see :data:`SINK_FILES`) of ``sinks`` (a
    :class:`~rope_leak.output.records.SinkRecord`, or a sink analysis, whose record is
    taken) into ``out_dir``."""
    from rope_leak.output.plots_sinks import sinks_html  # deferred: plotly takes ~1 s to import

    record = as_sink_record(sinks)
    out = check_output_dir(out_dir, overwrite, SINK_FILES)
    payload = to_jsonable({"rope_leak_sinks": 1,
                           "provenance": {"versions": package_versions(), **(provenance or {})},
                           **record.summary})
    atomic_write_text(out / "sinks.json", json.dumps(payload, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "sink_heads.csv", _csv(record.heads))
    atomic_write_text(out / "trajectory.csv", _csv(record.trajectory_table()))
    probe = record.probe
    if probe is None:  # say so in the file too, never leave it out silently
        probe = pd.DataFrame([{"features": None, "run": False,
                               "reason": record.probe_status.get("reason", "not run")}])
    atomic_write_text(out / "probe.csv", _csv(probe))
    if record.bos_table is not None:
        atomic_write_text(out / "bos_interventions.csv", _csv(record.bos_table))
    atomic_write_text(out / "sinks.html", sinks_html(record))
    return out
