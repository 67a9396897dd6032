"""The user's own text: ``.txt`` and ``.jsonl`` files, or a folder of them.

Layout rules (chosen so that one document is one stretch of running text):

* ``.txt`` -- one file is **one document**. Blank lines are paragraph breaks inside
  the document, not document breaks (paragraphs are usually far shorter than a
  256-token prompt). To put several documents in one ``.txt`` file, separate them with
  a form-feed character (``\\f``, ``\\x0c``) on its own; each non-empty section is then
  a document.
* ``.jsonl`` -- one JSON object per line, one document per line, its text in the
  ``"text"`` field (a string). An optional ``"title"`` field names it. Blank lines are
  skipped; records whose text is empty are skipped.
* a folder -- every ``*.txt`` and ``*.jsonl`` file below it (recursively, hidden files
  excluded), in sorted path order.

Files must be UTF-8 (a BOM is allowed). ``doc_id`` is the running index of the
document in that order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rope_leak.corpus.document import Document
from rope_leak.corpus.errors import CorpusError

__all__ = ["read_documents", "SUFFIXES"]

SUFFIXES = (".txt", ".jsonl")


def read_documents(path: str | os.PathLike) -> list[Document]:
    """All documents of a ``.txt`` / ``.jsonl`` file or of a folder of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(
            f"text source {str(path)!r} does not exist. Fix: check the path, or use "
            "source='wikipedia' for the bundled Wikipedia sample."
        )
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise CorpusError(
                f"folder {str(path)!r} contains no .txt or .jsonl files. Fix: put your "
                "text in .txt files (one document each) or .jsonl files (a 'text' field "
                "per line)."
            )
    else:
        files = [path]

    texts: list[tuple[str, str]] = []
    for file in files:
        texts.extend(_read_file(file))
    if not texts:
        raise CorpusError(
            f"{str(path)!r} holds no non-empty document. Fix: add text to the file(s)."
        )
    return [Document(doc_id=i, title=title, text=text) for i, (title, text) in enumerate(texts)]


def _read_file(file: Path) -> list[tuple[str, str]]:
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise CorpusError(
            f"{str(file)!r} is neither .txt nor .jsonl. Fix: save plain text as .txt (one "
            "document per file) or as .jsonl with a 'text' field per line."
        )
    text = _read_utf8(file)
    if not text.strip():
        raise CorpusError(
            f"{str(file)!r} is empty (no text besides whitespace). Fix: add text to it or "
            "remove it from the source."
        )
    if suffix == ".txt":
        sections = [s.strip() for s in text.split("\f")]
        named = len([s for s in sections if s]) > 1
        return [
            (f"{file.name}#{k}" if named else file.name, s) for k, s in enumerate(sections) if s
        ]
    return _parse_jsonl(file, text)


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(
            f"{str(file)!r} looks binary (it contains NUL bytes, the first at offset "
            f"{nul}). Fix: pass a UTF-8 text file (.txt or .jsonl), not "
            "a binary or UTF-16 file; convert with e.g. `iconv -f utf-16 -t utf-8`."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{str(file)!r} is not valid UTF-8 (bad byte at offset {err.start}); it may be "
            "binary or in another encoding. Fix: convert it to UTF-8, e.g. "
            "`iconv -f latin1 -t utf-8 in.txt > out.txt`."
        ) from None


def _parse_jsonl(file: Path, text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{file.name} line {number} is not valid JSON ({err.msg}). Fix: write one "
                'JSON object per line, e.g. {"text": "..."}.'
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise CorpusError(
                f"{file.name} line {number} has no 'text' field. Fix: store each document "
                'as a JSON object with its text under "text", e.g. {"text": "...", '
                '"title": "optional"}.'
            )
        body = record["text"]
        if not isinstance(body, str):
            raise CorpusError(
                f"{file.name} line {number}: 'text' is a {type(body).__name__}, not a "
                'string. Fix: store the document text as a JSON string, e.g. {"text": "..."}.'
            )
        if body.strip():
            title = record.get("title")
            out.append((str(title) if title else f"{file.name}:{number}", body.strip()))
    if not out:
        raise CorpusError(
            f"{str(file)!r} has no record with non-empty 'text'. Fix: fill the 'text' fields."
        )
    return out
