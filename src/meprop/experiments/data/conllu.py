"""CoNLL-U reading for POS tagging and dependency parsing (UD English EWT).

A :class:`Sentence` holds the syntactic words only (integer IDs): multiword-token ranges
(``2-3``) and empty nodes (``8.1``) are skipped, as taggers and parsers score words.

Parsing is done by the ``conllu`` library. Its exceptions carry no line numbers, so the file
is first split into sentence blocks here while counting lines, and each line is checked
(10 TAB-separated columns, a valid ID, an integer HEAD, ...) so that an error names the file
and the line.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .download import ensure_file
from .paths import DataError

__all__ = ["ConlluError", "EWT_SPLITS", "Sentence", "load_ud_ewt", "read_conllu"]

COLUMNS = ("ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC")
#: The UD English EWT splits and their files.
EWT_SPLITS = {
    "train": "en_ewt-ud-train.conllu",
    "dev": "en_ewt-ud-dev.conllu",
    "test": "en_ewt-ud-test.conllu",
}
EWT_DATASET = "ud_english_ewt"

_WORD_ID = re.compile(r"[1-9][0-9]*")
_RANGE_ID = re.compile(r"([1-9][0-9]*)-([1-9][0-9]*)")
_EMPTY_ID = re.compile(r"(0|[1-9][0-9]*)\.[1-9][0-9]*")
_HEAD = re.compile(r"0|[1-9][0-9]*")


class ConlluError(DataError, ValueError):
    """Malformed CoNLL-U input; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path: str | os.PathLike[str], line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class Sentence:
    """The syntactic words of one sentence, one list entry per word.

    ``heads[i]`` is the 1-based index of word ``i``'s head, 0 for the root.
    """

    forms: list[str] = field(default_factory=list)
    upos: list[str] = field(default_factory=list)
    xpos: list[str] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    deprels: list[str] = field(default_factory=list)
    sent_id: str | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.forms), len(self.upos), len(self.xpos)}
        lengths |= {len(self.heads), len(self.deprels)}
        if len(lengths) != 1:
            raise ValueError(
                f"Sentence {self.sent_id!r}: forms, upos, xpos, heads and deprels must have "
                f"the same length, got {len(self.forms)}, {len(self.upos)}, {len(self.xpos)}, "
                f"{len(self.heads)}, {len(self.deprels)}"
            )

    def __len__(self) -> int:
        return len(self.forms)


def _blocks(path: Path) -> Iterator[list[tuple[int, str]]]:
    """The file's sentence blocks, each a list of (1-based line number, line) pairs.

    Blocks are separated by blank lines, as in ``conllu.parse_incr``.
    """
    block: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConlluError(path, number, f"not UTF-8: {e}") from e
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is harmless
            line = line.rstrip("\r\n")
            if "\r" in line:
                raise ConlluError(
                    path,
                    number,
                    "a carriage return (CR) inside the line: the file has CR-only (old Mac) "
                    "line endings; convert them to LF (e.g. tr '\\r' '\\n')",
                )
            if line and not line.strip():  # (the UD validator refuses them too)
                raise ConlluError(
                    path,
                    number,
                    "a line of only whitespace: a sentence ends at an empty line; make it "
                    "empty, or remove it",
                )
            if line.strip():
                block.append((number, line))
            elif block:
                yield block
                block = []
    if block:
        yield block


def _check_block(path: Path, block: list[tuple[int, str]]) -> int:
    """Check each line of a sentence block; return its number of words."""
    word_lines: list[tuple[int, int]] = []  # (line number, head) per word
    for number, line in block:
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != len(COLUMNS):
            raise ConlluError(
                path,
                number,
                f"expected {len(COLUMNS)} TAB-separated columns, found {len(cols)}: {line!r}",
            )
        for name, value in zip(COLUMNS, cols, strict=True):
            if not value:
                raise ConlluError(path, number, f"column {name} is empty (write '_' instead)")
            # The conllu library also splits columns at two spaces in a row.
            if "  " in value:
                raise ConlluError(path, number, f"column {name} holds two spaces: {value!r}")
        tid, head = cols[0], cols[6]
        if _RANGE_ID.fullmatch(tid) or _EMPTY_ID.fullmatch(tid):
            continue  # multiword token or empty node: not a syntactic word
        if not _WORD_ID.fullmatch(tid):
            raise ConlluError(
                path, number, f"invalid ID {tid!r} (expected N, N-M for a multiword, or N.K)"
            )
        if int(tid) != len(word_lines) + 1:
            raise ConlluError(
                path, number, f"word ID {tid} out of order: expected {len(word_lines) + 1}"
            )
        if not _HEAD.fullmatch(head):
            raise ConlluError(
                path, number, f"HEAD {head!r} of word {tid} is not an integer (0 = root)"
            )
        if cols[7] == "_":
            raise ConlluError(path, number, f"DEPREL of word {tid} is missing ('_')")
        word_lines.append((number, int(head)))

    if not word_lines:
        raise ConlluError(path, block[0][0], "sentence block without any word lines")
    n = len(word_lines)
    for word, (number, head) in enumerate(word_lines, start=1):
        if head > n:
            raise ConlluError(path, number, f"HEAD {head} is beyond the sentence's last word ({n})")
        if head == word:
            raise ConlluError(path, number, f"word {word} is its own head (HEAD {head})")
    _check_tree(path, block[0][0], word_lines)
    return n


def _check_tree(path: Path, first: int, word_lines: list[tuple[int, int]]) -> None:
    """The heads form one tree: exactly one word attached to the root (HEAD 0), no cycle."""
    roots = [(number, w) for w, (number, head) in enumerate(word_lines, start=1) if head == 0]
    if not roots:
        raise ConlluError(path, first, "the sentence has no root (no word with HEAD 0)")
    if len(roots) > 1:
        words = ", ".join(str(w) for _, w in roots)
        raise ConlluError(
            path, roots[1][0], f"the sentence has {len(roots)} roots (words {words} have HEAD 0)"
        )
    heads = [0] + [head for _, head in word_lines]
    reaches_root = [False] * len(heads)
    reaches_root[0] = True
    for start in range(1, len(heads)):
        seen, w = [], start
        while not reaches_root[w] and w not in seen:
            seen.append(w)
            w = heads[w]
        if not reaches_root[w]:  # came back to a word of this walk: a cycle
            cycle = seen[seen.index(w) :]
            raise ConlluError(
                path,
                word_lines[w - 1][0],
                "the heads form a cycle (words "
                + " -> ".join(str(c) for c in [*cycle, w])
                + "), not a tree",
            )
        for v in seen:
            reaches_root[v] = True


def read_conllu(path: str | os.PathLike[str]) -> list[Sentence]:
    """Read a CoNLL-U file into sentences of syntactic words.

    Raises :class:`ConlluError` (``path:line: message``) for malformed input: a wrong number
    of columns, an invalid ID, IDs out of order, a non-integer or out-of-range HEAD, heads
    that do not form one tree (a word its own head, a cycle, no root or two roots), a
    missing DEPREL, non-UTF-8 bytes, a file without any sentence.
    """
    try:
        import conllu
    except ImportError as e:  # an optional dependency
        raise ImportError(
            "reading CoNLL-U needs the 'conllu' package: pip install 'meprop[experiments]'"
        ) from e

    path = Path(path)
    sentences: list[Sentence] = []
    for block in _blocks(path):
        n_words = _check_block(path, block)
        first, last = block[0][0], block[-1][0]
        try:
            (tokens,) = conllu.parse_incr(io.StringIO("\n".join(line for _, line in block)))
        except (conllu.exceptions.ParseException, ValueError) as e:
            raise ConlluError(path, first, f"in the sentence on lines {first}-{last}: {e}") from e
        words = [t for t in tokens if isinstance(t["id"], int)]
        if len(words) != n_words:  # a safety net: conllu must see the lines as we do
            raise ConlluError(
                path,
                first,
                f"the conllu library read {len(words)} words in lines {first}-{last}, "
                f"expected {n_words}",
            )
        sentences.append(
            Sentence(
                forms=[t["form"] for t in words],
                upos=[t["upos"] for t in words],
                # conllu turns XPOS '_' into None; keep the file's '_'.
                xpos=[t["xpos"] or "_" for t in words],
                heads=[t["head"] for t in words],
                deprels=[t["deprel"] for t in words],
                sent_id=tokens.metadata.get("sent_id"),
            )
        )
    if not sentences:
        raise ConlluError(path, 1, "the file holds no sentence (empty, or comments only)")
    return sentences


def load_ud_ewt(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    splits: Sequence[str] = ("train", "dev", "test"),
    base_url: str | None = None,
) -> dict[str, list[Sentence]]:
    """Load UD English EWT r2.16: ``{"train": [...], "dev": [...], "test": [...]}``.

    ``root``, ``download`` and ``base_url`` are as in :func:`meprop.experiments.data.ensure_file`;
    ``splits`` picks which splits to read (train alone takes a few seconds).
    """
    unknown = [s for s in splits if s not in EWT_SPLITS]
    if unknown:
        raise ValueError(f"unknown EWT split(s) {unknown}; the splits are {list(EWT_SPLITS)}")
    return {
        split: read_conllu(
            ensure_file(EWT_DATASET, EWT_SPLITS[split], root, download, base_url=base_url)
        )
        for split in splits
    }
