"""``Document``: one piece of running text (an article, a file, a JSONL record)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One document of a text source.

    Attributes:
        doc_id: identifier of the document within its source (the page id for
            Wikipedia, the running index for user files). Chunks record it so every
            prompt can be traced back to its text.
        title: human-readable name (article title, ``file.txt``, ``file.jsonl:3``).
        text: the plain text; chunks are cut from its tokenisation.
    """

    doc_id: int
    title: str
    text: str

    def to_dict(self) -> dict:
        return {"doc_id": self.doc_id, "title": self.title, "text": self.text}

    @classmethod
    def from_dict(cls, record: dict) -> Document:
        return cls(
            doc_id=int(record["doc_id"]), title=str(record["title"]), text=str(record["text"])
        )
