"""Real English Wikipedia text with no internet but PyPI.

The source is the shortened English Wikipedia dump that ships as a test fixture in the
``gensim==4.4.0`` wheel,
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(1.7 MB bz2, about 100 articles). Only that one file is extracted from the wheel (via
``rope_leak.download_cache.fetch_wheel_member``, sha256-checked); gensim itself is never
installed or imported.

Attribution: the text is from English Wikipedia (https://en.wikipedia.org), by
Wikipedia contributors, licensed under the Creative Commons Attribution-ShareAlike
licence (CC BY-SA 3.0 at the time of the dump, https://creativecommons.org/licenses/by-sa/3.0/).
The text was converted from wikitext to plain text (markup, templates, tables,
references, files and categories removed). ``WIKIPEDIA_ATTRIBUTION`` carries this
notice into every ``Corpus`` built from it, and so into results.json.

Kept: main-namespace articles (``<ns>0</ns>``) that are not redirects or
disambiguation pages and have at least ``MIN_ARTICLE_CHARS`` characters once cleaned.

Cleaning (``clean_wikitext``): the trailing reference sections ("See also",
"References", "External links", ...) are cut; tables, ``<ref>``s, galleries, file /
image / category / interlanguage links and comments are removed; the rest goes
through ``mwparserfromhell``'s ``strip_code()``; leftover markup lines are dropped and
whitespace is collapsed (single spaces, paragraphs separated by one blank line).
Cleaned articles are cached as JSONL under ``cache_dir()/corpus/`` so later calls take
milliseconds.
"""

from __future__ import annotations

import bz2
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mwparserfromhell

from rope_leak.corpus.document import Document
from rope_leak.corpus.errors import CorpusError
from rope_leak.download_cache import (
    atomic_write_text,
    cache_dir,
    fetch_wheel_member,
    file_lock,
    remove_stale_temporaries,
)

__all__ = [
    "WIKIPEDIA_ATTRIBUTION",
    "WikiPage",
    "clean_wikitext",
    "fetch_wikipedia_dump",
    "iter_wiki_pages",
    "wikipedia_documents",
]

DUMP_REQUIREMENT = "gensim==4.4.0"
DUMP_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
CLEANER_VERSION = 1  # bump whenever clean_wikitext changes, so the cache is rebuilt
MIN_ARTICLE_CHARS = 200  # shorter cleaned articles (stubs, disambiguation) are dropped

WIKIPEDIA_ATTRIBUTION = (
    "Text from English Wikipedia (https://en.wikipedia.org), by Wikipedia contributors, "
    "licensed CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/); shortened "
    "dump enwiki-latest-pages-articles1.xml-p000000010p000030302 as shipped in the "
    "gensim 4.4.0 test data; converted to plain text (markup removed) by rope_leak."
)

_TAIL_SECTIONS = (
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
)
_TAIL_RE = re.compile(
    r"^==+\s*(" + "|".join(re.escape(s) for s in _TAIL_SECTIONS) + r")\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_DROP_TAGS = {
    "ref",
    "references",
    "table",
    "gallery",
    "math",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
    "source",
    "chem",
    "ce",
    "graph",
    "templatedata",
    "hiero",
    "code",
}
_LINK_NAMESPACES = {"file", "image", "category", "media"}
_INTERLANG_RE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
_JUNK_LINE_RE = re.compile(r"^\s*(\{\||\|\}|\|-|\||!|thumb\||\{\{|\}\}|\*\s*$|#\s*$)")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;:]?\s*(?:[,;:]\s*)*\)")
_SPACES_RE = re.compile(r"[ \t\u00a0]+")
_SPACE_PUNCT_RE = re.compile(r" +([,.;:])")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_COMMENT_RE = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
_REF_RE = re.compile(
    r"<ref\b[^>]*/\s*>|<ref\b[^>]*>.*?</ref\s*>|<references\b[^>]*/\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_FILE_LINK_RE = re.compile(
    r"\[\[\s*(?:file|image|category|media)\s*:(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]",
    re.IGNORECASE,
)
_LINK_RE = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_HTML_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")


@dataclass(frozen=True)
class WikiPage:
    """One ``<page>`` of a MediaWiki XML dump, before cleaning."""

    page_id: int
    title: str
    namespace: int
    redirect: bool
    wikitext: str


def fetch_wikipedia_dump() -> Path:
    """Path of the sha256-checked dump in ``cache_dir()/corpus/``, downloading once."""
    dest = cache_dir() / "corpus" / Path(DUMP_MEMBER).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    return fetch_wheel_member(DUMP_REQUIREMENT, DUMP_MEMBER, DUMP_SHA256, dest)


def iter_wiki_pages(path: str | Path) -> Iterator[WikiPage]:
    """Stream the pages of a (bz2-compressed or plain) MediaWiki XML export.

    Works for any export schema version: the MediaWiki namespace is taken from the
    root element. Memory stays flat: each page is cleared once read.
    """
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as stream:
        context = ET.iterparse(stream, events=("start", "end"))
        ns = ""
        for event, elem in context:
            if event == "start":
                if not ns and elem.tag.startswith("{"):
                    ns = elem.tag[: elem.tag.index("}") + 1]
                continue
            if elem.tag != f"{ns}page":
                continue
            revision = elem.find(f"{ns}revision")
            text_elem = revision.find(f"{ns}text") if revision is not None else None
            yield WikiPage(
                page_id=int(elem.findtext(f"{ns}id", default="-1")),
                title=elem.findtext(f"{ns}title", default=""),
                namespace=int(elem.findtext(f"{ns}ns", default="0")),
                redirect=elem.find(f"{ns}redirect") is not None,
                wikitext=(text_elem.text or "") if text_elem is not None else "",
            )
            elem.clear()


def _link_is_junk(title: str) -> bool:
    title = title.strip()
    prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
    return prefix in _LINK_NAMESPACES or bool(_INTERLANG_RE.match(title))


def _drop_tables(wikitext: str) -> str:
    """Remove ``{| ... |}`` tables (nested too) line by line; cheaper than parsing them."""
    out, depth = [], 0
    for line in wikitext.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        if depth == 0:
            out.append(line)
        elif stripped.startswith("|}"):
            depth -= 1
    return "\n".join(out)


def _remove_nodes(code: mwparserfromhell.wikicode.Wikicode) -> None:
    doomed = [
        node
        for node in code.filter_tags(recursive=True)
        if str(node.tag).strip().lower() in _DROP_TAGS
    ]
    doomed += [
        link for link in code.filter_wikilinks(recursive=True) if _link_is_junk(str(link.title))
    ]
    for node in doomed:
        try:
            code.remove(node)
        except ValueError:  # already gone with a removed parent
            pass


def _strip_leftovers(text: str) -> str:
    """Regex clean-up of markup that the parser left as text (unbalanced markup)."""
    text = _REF_RE.sub("", text)
    for _ in range(5):  # innermost templates first
        text, n = _TEMPLATE_RE.subn("", text)
        if not n:
            break
    text = _FILE_LINK_RE.sub("", text)
    text = _LINK_RE.sub(lambda m: m.group(2) or m.group(1), text)
    text = _HTML_TAG_RE.sub("", text)
    return text


def clean_wikitext(wikitext: str) -> str:
    """Plain running text of one article's wikitext (see the module docstring)."""
    tail = _TAIL_RE.search(wikitext)
    if tail:
        wikitext = wikitext[: tail.start()]
    wikitext = _COMMENT_RE.sub("", wikitext)
    wikitext = _REF_RE.sub("", wikitext)
    wikitext = _drop_tables(wikitext)
    code = mwparserfromhell.parse(wikitext)
    _remove_nodes(code)
    text = _strip_leftovers(code.strip_code(normalize=True, collapse=True))
    lines = []
    for line in text.splitlines():
        if _JUNK_LINE_RE.match(line):
            continue
        line = _EMPTY_PARENS_RE.sub("", line)
        line = _SPACES_RE.sub(" ", line).strip()
        line = _SPACE_PUNCT_RE.sub(r"\1", line)
        lines.append(line)
    text = "\n".join(lines)
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


def _cache_path() -> Path:
    return cache_dir() / "corpus" / f"enwiki-shortened-clean-v{CLEANER_VERSION}.jsonl"


def _build_documents(dump: Path) -> list[Document]:
    docs = []
    for page in iter_wiki_pages(dump):
        if page.redirect or page.namespace != 0 or page.title.endswith("(disambiguation)"):
            continue
        text = clean_wikitext(page.wikitext)
        if len(text) < MIN_ARTICLE_CHARS:
            continue
        docs.append(Document(doc_id=page.page_id, title=page.title, text=text))
    return docs


def wikipedia_documents(*, refresh: bool = False) -> list[Document]:
    """The cleaned articles of the bundled Wikipedia sample, one ``Document`` each.

    The first call fetches the dump (one wheel download from PyPI), parses and cleans
    it (a few seconds) and caches the result as JSONL; later calls read the cache.
    ``refresh=True`` rebuilds the cache. ``Document.doc_id`` is the Wikipedia page id.
    Cite ``WIKIPEDIA_ATTRIBUTION`` wherever the text or results derived from it appear.
    """
    path = _cache_path()
    if not refresh and path.exists():
        return _read_cache(path)
    with file_lock(path):
        if not refresh and path.exists():
            return _read_cache(path)  # another process built it while we waited
        remove_stale_temporaries(path)  # left by a process killed while building it
        dump = fetch_wikipedia_dump()
        t0 = time.perf_counter()
        docs = _build_documents(dump)
        if not docs:
            raise CorpusError(
                f"no article survived cleaning of {dump}. Fix: delete the file so it is "
                "fetched again, and report a bug if this persists."
            )
        atomic_write_text(
            path,
            "".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in docs),
        )
        print(
            f"rope_leak: cleaned {len(docs)} Wikipedia articles in "
            f"{time.perf_counter() - t0:.1f} s; cached at {path}",
            file=sys.stderr,
        )
    return docs


def _read_cache(path: Path) -> list[Document]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [Document.from_dict(json.loads(line)) for line in handle if line.strip()]
    except (json.JSONDecodeError, KeyError, ValueError):
        print(f"rope_leak: cache {path} is unreadable; rebuilding it.", file=sys.stderr)
        path.unlink(missing_ok=True)
        return wikipedia_documents(refresh=True)
