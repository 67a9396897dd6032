"""Module paths from before the package was arranged by data flow, kept importable.

``import rope_leak.analysis`` or ``from rope_leak.metrics.sinks import sink_scores`` still
work: the old name resolves to the module that now holds the code (the same module object,
so nothing is copied), with a ``DeprecationWarning`` naming the new path. Only names under
``rope_leak`` are affected. New code should import the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED: dict[str, str] = {
    "rope_leak.analysis": "rope_leak.analyses.analysis",
    "rope_leak.analysis_arch": "rope_leak.analyses.architectures",
    "rope_leak.cache": "rope_leak.download_cache",
    "rope_leak.explore": "rope_leak.analyses.explore",
    "rope_leak.head_result": "rope_leak.analyses.head_result",
    "rope_leak.metrics.bos": "rope_leak.analyses.bos_interventions",
    "rope_leak.metrics.bos_status": "rope_leak.analyses.bos_status",
    "rope_leak.metrics.decomposition": "rope_leak.fits.decomposition",
    "rope_leak.metrics.degenerate": "rope_leak.fits.degenerate",
    "rope_leak.metrics.depth": "rope_leak.fits.depth",
    "rope_leak.metrics.fingerprint": "rope_leak.analyses.fingerprint",
    "rope_leak.metrics.position_models": "rope_leak.fits.position_models",
    "rope_leak.metrics.profiles": "rope_leak.fits.profiles",
    "rope_leak.metrics.shares": "rope_leak.fits.shares",
    "rope_leak.metrics.sink_reading": "rope_leak.analyses.sink_reading",
    "rope_leak.metrics.sinks": "rope_leak.analyses.sink_scores",
    "rope_leak.metrics.split": "rope_leak.fits.split",
    "rope_leak.metrics.trajectory": "rope_leak.analyses.trajectory",
    "rope_leak.models": "rope_leak.backends",
    "rope_leak.models.bridge": "rope_leak.backends.bridge",
    "rope_leak.models.errors": "rope_leak.backends.errors",
    "rope_leak.models.files": "rope_leak.backends.files",
    "rope_leak.models.gemma3": "rope_leak.backends.gemma3",
    "rope_leak.models.loading": "rope_leak.backends.loading",
    "rope_leak.models.requirements": "rope_leak.backends.requirements",
    "rope_leak.models.tiny": "rope_leak.backends.tiny",
    "rope_leak.models.zoo": "rope_leak.backends.zoo",
    "rope_leak.patching": "rope_leak.analyses.patching",
    "rope_leak.plots": "rope_leak.output.plots",
    "rope_leak.plots_arch": "rope_leak.output.plots_architectures",
    "rope_leak.plots_sinks": "rope_leak.output.plots_sinks",
    "rope_leak.report": "rope_leak.output.report",
    "rope_leak.results": "rope_leak.output.results",
    "rope_leak.scale": "rope_leak.output.shards",
    "rope_leak.sink_analysis": "rope_leak.analyses.sinks",
    "rope_leak.stats": "rope_leak.inference",
    "rope_leak.stats.bootstrap": "rope_leak.inference.bootstrap",
    "rope_leak.stats.debias": "rope_leak.fits.debias",
    "rope_leak.stats.fdr": "rope_leak.inference.fdr",
    "rope_leak.stats.inference": "rope_leak.inference.intervals",
    "rope_leak.stats.nulls": "rope_leak.inference.nulls",
    "rope_leak.stats.projection": "rope_leak.fits.projection",
}
# Old packages that only held moved modules: importable so their old submodules resolve.
EMPTIED = ("rope_leak.metrics",)


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new: str | None):
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if self.new is None:
            module = types.ModuleType(spec.name, "Moved; see rope_leak.moved_modules.MOVED.")
            module.__path__ = []
            return module
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there.",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if self.new is not None:
            # the import system stamps the old name's spec on the module: give it back its own
            module.__spec__ = self.spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED or fullname in EMPTIED:
            loader = _MovedLoader(MOVED.get(fullname))
            return importlib.machinery.ModuleSpec(fullname, loader, is_package=fullname in EMPTIED)
        return None


def install() -> None:
    """Resolve the old module paths (idempotent)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
