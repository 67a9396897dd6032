"""How interventions install their hooks, so that all of them behave alike.

Every intervention hook is added through TransformerLens' own ``HookPoint.add_hook``
as a *permanent* hook and removed, by its handle, when the context exits (also on
error). Consequences, the same for every intervention in :mod:`rope_leak.interventions`:

* the hooks are visible to TransformerLens' introspection (``model.list_hooks()``,
  ``model.hook_dict[name].fwd_hooks``, ``HookPoint.has_hooks()``);
* ``model.reset_hooks()`` inside the context (and the temporary hooks of
  ``run_with_hooks`` / ``run_with_cache`` / ``model.hooks``) leave the intervention in
  place; only ``model.reset_hooks(including_permanent=True)`` removes it, as it removes
  every permanent hook;
* on exit exactly the hooks the context added are removed, whatever else was added
  meanwhile.

Hook names come from ``transformer_lens.utilities.get_act_name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from transformer_lens.utilities import get_act_name

HookFn = Callable[..., Any]

__all__ = ["act_name", "intervention_hooks"]


def act_name(name: str, layer: int | None = None) -> str:
    """TransformerLens' hook name, e.g. ``act_name("pattern", 3)`` ->
    ``"blocks.3.attn.hook_pattern"`` (``get_act_name``)."""
    return get_act_name(name, layer)


def _hook_point(model: Any, name: str):
    hook_point = model.hook_dict.get(name)
    if hook_point is None:
        raise ValueError(f"the model has no hook point {name!r}. Fix: check the layer index "
                         "(hook names follow transformer_lens.utilities.get_act_name).")
    return hook_point


@contextlib.contextmanager
def intervention_hooks(
    model: Any, hooks: Iterable[tuple[str, HookFn]], *, prepend: bool = False
) -> Iterator[Any]:
    """Add ``[(hook name, fn(activation, hook))]`` as permanent TransformerLens hooks for
    the duration of the context (see the module docstring).

    ``prepend=True`` puts each hook before the hooks already on its hook point, so that
    hooks added later (a user's, the engine's) see what it returns.
    """
    installed = []
    try:
        for name, fn in hooks:
            hook_point = _hook_point(model, name)
            hook_point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
            installed.append((hook_point, hook_point.fwd_hooks[0 if prepend else -1]))
        yield model
    finally:
        for hook_point, handle in reversed(installed):
            handle.hook.remove()  # idempotent: fine after reset_hooks(including_permanent=True)
            hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not handle]
