"""One way to name heads and layers, used by every function that takes them.

A *head spec* may be any of:

* ``None`` — every head of the model;
* an ``int`` ``l`` — every head of layer ``l``;
* a label ``"L3H1"`` (one head) or ``"L3"`` (every head of layer 3), case-insensitive;
* a pair ``(l, h)``;
* ``{l: [h, ...]}`` (a value may also be one ``int``, or ``None`` for the whole layer);
* a list (or any iterable) of pairs and labels, mixed freely.

A *layer spec* is ``None`` (all layers), an ``int``, a label ``"L3"``, or an iterable
of them. :func:`normalize_heads` and :func:`normalize_layers` check every index
against the model's ``n_layers`` / ``n_heads`` and raise :class:`HeadSpecError` (a
``ValueError``) naming the valid range. They accept anything that has ``n_layers``
and ``n_heads`` as the reference: a model (through its ``cfg``), its config, an
``Analysis``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from numbers import Integral
from typing import Any, Union

HeadSpec = Union[None, int, str, tuple, Mapping, Iterable]  # noqa: UP007 (a runtime alias)
LayerSpec = Union[None, int, str, Iterable]  # noqa: UP007

_HEAD_LABEL = re.compile(r"\s*L(\d+)\s*H(\d+)\s*", re.IGNORECASE)
_LAYER_LABEL = re.compile(r"\s*L(\d+)\s*", re.IGNORECASE)

SPEC_HELP = ("a head is given as (layer, head), 'L3H1', {layer: [head, ...]}, an int layer "
             "(all its heads), a list of these, or None (all heads)")


class HeadSpecError(ValueError):
    """A head or layer spec that is malformed or names a head the model does not have."""


def head_label(layer: int, head: int) -> str:
    """``"L{layer}H{head}"``."""
    return f"L{int(layer)}H{int(head)}"


def dimensions(reference: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a model, a config, an ``Analysis`` or a pair of ints."""
    if isinstance(reference, tuple) and len(reference) == 2:
        return int(reference[0]), int(reference[1])
    cfg = getattr(reference, "cfg", reference)
    try:
        return int(cfg.n_layers), int(cfg.n_heads)
    except AttributeError:
        raise TypeError(
            f"cannot read n_layers and n_heads from {type(reference).__name__}. Fix: pass the "
            "model (or its cfg)."
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _layer_range(n_layers: int) -> str:
    return f"layers 0..{n_layers - 1}"


def _check_layer(layer: int, n_layers: int) -> int:
    if not 0 <= layer < n_layers:
        raise HeadSpecError(
            f"layer {layer} does not exist: the model has {_layer_range(n_layers)}. "
            "Fix: pass a layer in that range (or None for all layers)."
        )
    return int(layer)


def _check_head(layer: int, head: int, n_layers: int, n_heads: int) -> tuple[int, int]:
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise HeadSpecError(
            f"head {head_label(layer, head)} does not exist: the model has heads 0..{n_heads - 1} "
            f"in {_layer_range(n_layers)}. Fix: pass a head in that range."
        )
    return int(layer), int(head)


def parse_label(text: str) -> tuple[int, int | None]:
    """``"L3H1"`` -> ``(3, 1)``; ``"L3"`` -> ``(3, None)`` (a whole layer)."""
    match = _HEAD_LABEL.fullmatch(text)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _LAYER_LABEL.fullmatch(text)
    if match:
        return int(match.group(1)), None
    raise HeadSpecError(f"{text!r} is not a head or layer label. Fix: write a head like 'L3H1' "
                        "and a layer like 'L3'.")


def _pairs(spec: Any, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Heads named by one spec element or a whole spec, unchecked order, checked range."""
    whole = lambda layer: [(layer, h) for h in range(n_heads)]  # noqa: E731
    if spec is None:
        return [pair for layer in range(n_layers) for pair in whole(layer)]
    if _is_int(spec):
        return whole(_check_layer(int(spec), n_layers))
    if isinstance(spec, str):
        layer, head = parse_label(spec)
        if head is None:
            return whole(_check_layer(layer, n_layers))
        return [_check_head(layer, head, n_layers, n_heads)]
    if isinstance(spec, tuple) and len(spec) == 2 and all(_is_int(v) for v in spec):
        return [_check_head(int(spec[0]), int(spec[1]), n_layers, n_heads)]
    if isinstance(spec, Mapping):
        out = []
        for layer, heads in spec.items():
            if not _is_int(layer):
                raise HeadSpecError(f"the keys of a {{layer: [head, ...]}} spec are layer ints, got "
                                    f"{layer!r}. Fix: {SPEC_HELP}.")
            _check_layer(int(layer), n_layers)
            if heads is None:
                out += whole(int(layer))
                continue
            heads = [heads] if _is_int(heads) else heads
            try:
                heads = list(heads)
            except TypeError:
                raise HeadSpecError(f"layer {layer}: {heads!r} is not a list of head indices. "
                                    f"Fix: {SPEC_HELP}.") from None
            for head in heads:
                if not _is_int(head):
                    raise HeadSpecError(f"layer {layer}: {head!r} is not a head index. Fix: {SPEC_HELP}.")
                out.append(_check_head(int(layer), int(head), n_layers, n_heads))
        return out
    if isinstance(spec, Iterable):
        items = list(spec)
        if items and all(_is_int(v) for v in items):
            raise HeadSpecError(
                f"{spec!r} is ambiguous: a list of plain ints could be layers or heads. Fix: pass "
                "layers as {layer: None} or as 'L3' labels, heads as [(layer, head), ...] or 'L3H1'."
            )
        out = []
        for item in items:
            if _is_int(item) or item is None:
                raise HeadSpecError(f"{item!r} inside a list of heads is ambiguous. Fix: {SPEC_HELP}.")
            out += _pairs(item, n_layers, n_heads)
        return out
    raise HeadSpecError(f"cannot read heads from {spec!r} ({type(spec).__name__}). Fix: {SPEC_HELP}.")


def normalize_heads(spec: HeadSpec, reference: Any) -> list[tuple[int, int]]:
    """Every head named by ``spec`` as sorted, distinct ``(layer, head)`` pairs.

    ``reference``: the model (or anything :func:`dimensions` reads). An empty spec
    (``[]``, ``{}``) is an error: it would silently do nothing.
    """
    n_layers, n_heads = dimensions(reference)
    pairs = sorted(set(_pairs(spec, n_layers, n_heads)))
    if not pairs:
        raise HeadSpecError(f"{spec!r} names no head. Fix: {SPEC_HELP}.")
    return pairs


def normalize_head(spec: Any, reference: Any) -> tuple[int, int]:
    """Exactly one head: ``(l, h)`` or ``"L3H1"``."""
    pairs = normalize_heads(spec, reference)
    if len(pairs) != 1:
        raise HeadSpecError(f"{spec!r} names {len(pairs)} heads, not one. Fix: pass one head, "
                            "e.g. (3, 1) or 'L3H1'.")
    return pairs[0]


def normalize_layers(spec: LayerSpec, reference: Any) -> list[int]:
    """Every layer named by ``spec`` (``None``: all), sorted and distinct."""
    n_layers = reference if _is_int(reference) else dimensions(reference)[0]
    if spec is None:
        return list(range(n_layers))
    items = [spec] if _is_int(spec) or isinstance(spec, str) else spec
    try:
        items = list(items)
    except TypeError:
        raise HeadSpecError(f"cannot read layers from {spec!r} ({type(spec).__name__}). Fix: pass "
                            "an int, 'L3', a list of them, or None for all layers.") from None
    out = set()
    for item in items:
        if isinstance(item, str):
            layer, head = parse_label(item)
            if head is not None:
                raise HeadSpecError(f"{item!r} names a head where a layer is expected. Fix: write 'L{layer}'.")
        elif _is_int(item):
            layer = int(item)
        else:
            raise HeadSpecError(f"{item!r} is not a layer. Fix: pass an int, 'L3', a list of them, "
                                "or None for all layers.")
        out.add(_check_layer(layer, n_layers))
    if not out:
        raise HeadSpecError(f"{spec!r} names no layer. Fix: pass at least one layer, or None for all.")
    return sorted(out)


def heads_by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """``[(l, h), ...]`` -> ``{l: [h, ...]}`` (sorted)."""
    out: dict[int, list[int]] = {}
    for layer, head in sorted(set(heads)):
        out.setdefault(layer, []).append(head)
    return out
