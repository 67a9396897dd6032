"""A model file a user brings is checked before use: a truncated or inconsistent GGUF or
safetensors file is an error naming the file, saying it is incomplete, and what to do."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from rope_leak.backends import load_model
from rope_leak.backends.errors import IncompleteModelFileError
from rope_leak.backends.files import check_gguf, check_safetensors
from rope_leak.cli import main


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A small GGUF file: metadata (strings, arrays) and float32 / float16 tensors."""
    from gguf import GGUFWriter

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "small")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((300, 64)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated_copy(path, tmp_path, fraction):
    out = tmp_path / f"cut_{path.name}"
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def test_whole_gguf_passes(gguf_file):
    check_gguf(gguf_file)


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.01])
def test_truncated_gguf_is_named_incomplete(gguf_file, tmp_path, fraction):
    cut = truncated_copy(gguf_file, tmp_path, fraction)
    with pytest.raises(IncompleteModelFileError) as err:
        check_gguf(cut)
    message = str(err.value)
    assert str(cut) in message and "incomplete" in message and "Fix:" in message
    assert "reshape" not in message


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(IncompleteModelFileError, match="magic"):
        check_gguf(bad)


def test_truncated_gguf_through_load_model_and_cli(gguf_file, tmp_path, capsys):
    cut = truncated_copy(gguf_file, tmp_path, 0.7)
    with pytest.raises(IncompleteModelFileError, match="truncated"):
        load_model(cut)
    code = main(["analyze", "--model", str(cut), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "incomplete or corrupt" in err and str(cut) in err
    assert "Traceback" not in err and not (tmp_path / "out" / "results.json").exists()


def test_truncated_and_inconsistent_safetensors(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    check_safetensors(weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(IncompleteModelFileError, match="truncated") as err:
        load_model(folder)
    assert str(weights) in str(err.value)
    # a header whose byte range disagrees with dtype and shape
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(IncompleteModelFileError, match="instead of"):
        check_safetensors(weights)


@pytest.mark.real_model
def test_real_gguf_truncated_to_30_mb(tmp_path):
    from rope_leak.backends.zoo import ZOO

    whole = ZOO["smollm2-135m"].fetch_gguf()
    check_gguf(whole)
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(whole, "rb") as handle:
        cut.write_bytes(handle.read(30 * 2**20))
    with pytest.raises(IncompleteModelFileError, match="was truncated") as err:
        load_model(cut)
    assert str(cut) in str(err.value)
