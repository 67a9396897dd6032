"""Scale out and resume: corpus shards, merging shard statistics, checkpoints.

A shard ``k/N`` takes a contiguous run of whole batches of the corpus (batch
boundaries as in a single run, so every prompt sees exactly the same forward pass) and
keeps the prompts' global indices, which fix their folds and buckets. Shards write
``statistics.npz`` and ``shard.json`` and no report; :func:`merge_shards` adds them up
(:meth:`RunStatistics.merge`) into the statistics of a single run over the whole corpus
(equal up to the order of float64 additions, ~1e-16 relative) and writes the full results.

Any engine that can start ``N`` processes can run the shards: separate shell jobs, one
process per GPU or node under ``torchrun`` (see ``examples/torchrun_shards.py``), Ray
tasks, a batch scheduler's job array.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rope_leak.download_cache import (
    atomic_write_text,
    folder_lock,
    recover_staged,
    remove_stale_writes,
    staged_files,
)

SHARD_FILE = "shard.json"
STATISTICS_FILE = "statistics.npz"
CHECKPOINT_FILE = "checkpoint.npz"
SHARD_STAGING_PREFIX = ".rope_leak_staging."  # as rope_leak.output.results.STAGING_PREFIX


def recover_shard_dir(out_dir: str | Path) -> Path:
    """Undo what a process killed while writing a shard into ``out_dir`` left: its
    staged, journaled write is rolled back (``statistics.npz`` and ``shard.json`` are the
    earlier pair again, or absent), its temporaries removed."""
    out = Path(out_dir)
    if out.is_dir():
        with folder_lock(out):
            recover_staged(out, SHARD_STAGING_PREFIX)
            remove_stale_writes(out, (STATISTICS_FILE, SHARD_FILE))
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"k/N"`` -> ``(k, N)`` with ``0 <= k < N``."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard must look like k/N (e.g. 0/4), got {text!r}.")
    k, n = int(match[1]), int(match[2])
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= k < N.")
    return k, n


def shard_prompts(n_prompts: int, batch_size: int, shard: tuple[int, int]) -> range:
    """Global indices of shard ``k/N``'s prompts: batches ``[k*B/N, (k+1)*B/N)`` of the
    ``B`` batches of a single run (contiguous; may be empty when ``N > B``)."""
    k, n = shard
    n_batches = -(-n_prompts // batch_size)
    if n > n_batches:
        raise ValueError(f"{n} shards for {n_batches} batches: some shards would be empty. "
                         f"Fix: use at most {n_batches} shards, or a smaller --batch-size.")
    first, last = k * n_batches // n, (k + 1) * n_batches // n
    return range(first * batch_size, min(last * batch_size, n_prompts))


def check_shard_output(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file. Fix: name a folder.")
    recover_shard_dir(out)
    existing = [n for n in (STATISTICS_FILE, SHARD_FILE) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a shard ({', '.join(existing)}). Fix: choose another "
                              "--out folder, or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_shard(stats, out_dir: str | Path, *, shard: tuple[int, int], n_prompts: int,
                provenance: dict, replaces: tuple[str, ...] = ()) -> Path:
    """Write a shard's statistics and its description (what merging needs to check),
    committed together (``shard.json`` last; see
    :func:`rope_leak.download_cache.staged_files`): a kill at any moment leaves the
    earlier pair or the new one. ``replaces``: more names removed in the same commit
    (e.g. ``checkpoint.npz``)."""
    out = Path(out_dir)
    info = {"rope_leak_shard": 1, "shard": list(shard), "n_prompts_total": n_prompts,
            "prompts": list(stats.prompts_done), "provenance": provenance}
    with staged_files(out, prefix=SHARD_STAGING_PREFIX, last=SHARD_FILE,
                      owned=(STATISTICS_FILE, SHARD_FILE, *replaces)) as staging:
        stats.save(staging / STATISTICS_FILE)
        atomic_write_text(staging / SHARD_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
    return out


def _read_shard_info(path: Path) -> dict:
    """A shard's ``shard.json``, checked: a clear error for a corrupt or foreign file."""
    fix = (f"Fix: rerun that shard (`rope-leak analyze --shard K/N --out {path.parent}`), or "
           "delete the folder if it is not a shard.")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable shard description ({err}). {fix}") from err
    shard = info.get("shard") if isinstance(info, dict) else None
    valid = (isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) for x in shard)
             and 0 <= shard[0] < shard[1])
    missing = [k for k in ("provenance", "n_prompts_total") if not isinstance(info, dict) or k not in info]
    if not valid or missing:
        raise ValueError(f"{path} is not a valid shard description (shard {shard!r}"
                         f"{', missing ' + ', '.join(missing) if missing else ''}). {fix}")
    return info


def load_shards(dirs):
    """``(merged RunStatistics, provenance)`` of complete, consistent shard folders."""
    from rope_leak.engine.statistics import RunStatistics

    shards = []
    for d in dirs:
        d = recover_shard_dir(d)  # a shard write killed mid-commit: its earlier pair, or none
        if not (d / SHARD_FILE).exists() or not (d / STATISTICS_FILE).exists():
            raise FileNotFoundError(f"{d} holds no finished shard ({SHARD_FILE} + {STATISTICS_FILE}). "
                                    "Fix: pass the --out folders of finished `analyze --shard` runs.")
        shards.append((_read_shard_info(d / SHARD_FILE), d))
    if not shards:
        raise ValueError("no shard folders given.")
    shards.sort(key=lambda s: s[0]["shard"][0])
    first = shards[0][0]
    for info, d in shards[1:]:
        if info["provenance"] != first["provenance"] or info["n_prompts_total"] != first["n_prompts_total"]:
            raise ValueError(f"{d} was run with other settings, model or corpus than {shards[0][1]}. "
                             "Fix: merge only shards of one `analyze` command line.")
    n = first["shard"][1]
    seen = [info["shard"] for info, _ in shards]
    if any(s[1] != n for s in seen) or sorted(s[0] for s in seen) != list(range(n)):
        raise ValueError(f"need each of the shards 0/{n}..{n - 1}/{n} exactly once, got "
                         f"{', '.join(f'{a}/{b}' for a, b in seen)}.")
    merged = None
    for _info, d in shards:
        stats = RunStatistics.load(d / STATISTICS_FILE, kind="shard statistics file")
        merged = stats if merged is None else merged.merge(stats)
    if merged.prompts_done != list(range(first["n_prompts_total"])):
        raise ValueError("the shards do not cover the corpus exactly once. Fix: rerun the missing shards.")
    return merged, first["provenance"]
