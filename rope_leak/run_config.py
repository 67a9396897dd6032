"""Every option of a run, written once: :class:`RunConfig`.

The command line builds its options from the fields (:func:`add_arguments`),
:func:`rope_leak.run` takes a config and/or keyword overrides, and ``results.json``
records :meth:`RunConfig.settings`.

>>> config = RunConfig(prompts=16, tokens=128)
>>> config.pairs.label()
'1<=i<n,1<=j<=i'
>>> RunConfig().replace(window=16).window
16
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from rope_leak.engine.pairs import PairSpec
from rope_leak.engine.start_cut import DEFAULT_WINDOW

DTYPE_NAMES = ("bfloat16", "float16", "float32")
TARGET_NAMES = ("pattern", "log_pattern", "scores")


def option(default: Any, help: str, *, flag: str | None = None, minimum: float | None = None,
           choices: tuple | None = None, group: str = "run", metavar: str | None = None) -> Any:
    """A :class:`RunConfig` field with what the command line needs to offer it."""
    return field(default=default, metadata={"help": help, "flag": flag, "minimum": minimum,
                                            "choices": choices, "group": group, "metavar": metavar})


@dataclass(frozen=True)
class RunConfig:
    """The settings of one ``rope-leak analyze`` / :func:`rope_leak.run`.

    Groups (``metadata["group"]``): ``run`` (every command), ``analyze`` (the full
    analysis only), ``scale`` (shards and checkpoints)."""

    prompts: int = option(64, "number of chunks P (default 64)", minimum=1)
    tokens: int = option(256, "tokens per chunk n (default 256)", minimum=1)
    seed: int = option(0, "sampling seed (default 0)")
    target: str = option("pattern", "response whose share is headlined (all three are computed)",
                         choices=TARGET_NAMES)
    include_sink: bool = option(False, "score key 0 as well")
    min_query: int = option(1, "smallest query position scored (default 1)")
    max_query: int | None = option(None, "score only queries i < this")
    max_offset: int | None = option(None, "score only pairs with i - j < this", minimum=1)
    window: int = option(DEFAULT_WINDOW, "the completed split's reference window w: its profile and "
                         f"scored queries start at i = w (default {DEFAULT_WINDOW})", minimum=1)
    batch_size: int = option(8, "prompts per forward pass (default 8)", minimum=1)
    device: str = option("cpu", "torch device (default cpu)")
    dtype: str = option("float32", "model dtype (default float32)", choices=DTYPE_NAMES)
    sinks: bool = option(True, "skip the sink analysis (sink reading, position-0 trajectories, "
                         "fingerprint probe, BOS interventions) and its report sections",
                         flag="--no-sinks", group="analyze")
    sink_prompts: int = option(16, "prompts used by the sink analysis, the first of the corpus (default 16)",
                               minimum=1, group="analyze")
    reading_prompts: int = option(4, "prompts used for sink reading, which reruns every layer (default 4)",
                                  minimum=1, group="analyze")
    bos_prompts: int = option(16, "prompts used by the BOS interventions, the first of the corpus; they "
                              "run only the first 32 tokens (default 16)", minimum=1, group="analyze")
    save_statistics: bool = option(False, "also write statistics.npz, the run's sufficient statistics, "
                                   "to merge or refit later", group="analyze")
    cell_maps: bool = option(False, "also keep per-cell sums (O(n^2) per head): the cell-mean ceiling "
                             "M_cell, the permutation null and per-cell maps", group="analyze")
    shard: str | None = option(None, "run only shard k of N (contiguous whole batches) and write its "
                               "statistics.npz + shard.json; combine with `rope-leak merge`",
                               group="scale", metavar="k/N")
    checkpoint_minutes: float = option(10.0, "save resumable statistics to --out/checkpoint.npz at most "
                                       "this often (default 10; 0: only with --checkpoint-every)",
                                       minimum=0, group="scale")
    checkpoint_every: int = option(0, "also checkpoint after every K batches (default 0: off)",
                                   minimum=0, group="scale", metavar="K")
    force: bool = option(False, "run even when the memory estimate exceeds what is available",
                         group="analyze")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{f.name}={value!r} is not one of {meta['choices']}. Fix: pass one of them.")
            if meta["minimum"] is not None and value is not None and value < meta["minimum"]:
                raise ValueError(f"{f.name}={value!r} must be >= {meta['minimum']}. Fix: pass a larger value.")
        self.pairs  # noqa: B018  (PairSpec checks the pair options)

    @property
    def pairs(self) -> PairSpec:
        return PairSpec(include_sink=self.include_sink, min_query=self.min_query,
                        max_query=self.max_query, max_offset=self.max_offset)

    def replace(self, **changes) -> RunConfig:
        """A copy with ``changes``; ``pairs=PairSpec(...)`` sets the four pair options."""
        if "dtype" in changes:  # a torch dtype is named by its string
            changes["dtype"] = str(changes["dtype"]).removeprefix("torch.")
        pairs = changes.pop("pairs", None)
        if pairs is not None:
            changes.update(include_sink=pairs.include_sink, min_query=pairs.min_query,
                           max_query=pairs.max_query, max_offset=pairs.max_offset)
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown run options {unknown}. Fix: use RunConfig's fields: {sorted(known)}.")
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """What ``results.json`` records (every field but where and how it was split up)."""
        out = dataclasses.asdict(self)
        for name in ("shard", "checkpoint_minutes", "checkpoint_every", "force"):
            out.pop(name)
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """From parsed arguments (fields the parser did not offer keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _type(f, default):
    minimum = f.metadata["minimum"]
    cast = float if isinstance(default, float) else int

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if cast is float else 'whole number'}") from err
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, groups=("run",), **defaults) -> None:
    """Add the fields of ``groups`` as options (``--batch-size`` for ``batch_size``);
    ``defaults``: other defaults for this command (e.g. ``prompts=32``)."""
    arguments = {"scale": parser.add_argument_group("scale out and resume")}
    for f in fields(RunConfig):
        meta = f.metadata
        if meta["group"] not in groups:
            continue
        target = arguments.get(meta["group"], parser)
        default = defaults.get(f.name, f.default)
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            # a default-True option is offered as its negation (--no-sinks)
            action = "store_false" if f.default else "store_true"
            target.add_argument(flag, dest=f.name, action=action, default=default, help=meta["help"])
        elif meta["choices"]:
            target.add_argument(flag, dest=f.name, choices=meta["choices"], default=default, help=meta["help"])
        elif isinstance(f.default, str) or f.name in ("shard",):
            target.add_argument(flag, dest=f.name, default=default, help=meta["help"], metavar=meta["metavar"])
        else:
            sample = f.default if f.default is not None else 0
            kind = _type(f, sample) if meta["minimum"] is not None else type(sample)
            target.add_argument(flag, dest=f.name, type=kind, default=default,
                                help=meta["help"], metavar=meta["metavar"])
