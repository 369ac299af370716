"""A folder of the user's documents → token chunks for training, with a report of what was used.

Reads, recursively: `.txt`/`.md` (UTF-8, UTF-16 with BOM, else cp1252), `.pdf` (pypdf), `.html`/
`.htm` (visible text only, stdlib `html.parser`), `.docx` (python-docx), and `.jsonl` in mlx-lm's
three formats: `{"text"}`, `{"prompt", "completion"}` and `{"messages": [...]}`. Anything else,
or a file that cannot be read (binary, encrypted or broken PDF), is skipped with the reason and
the rest is used.

Each document becomes one token stream: the tokenizer's own special tokens (BOS if its `encode`
adds one) + text + EOS, with a per-token loss mask. Chat and prompt/completion records are
rendered through the chat template and only assistant turns are trained on. Streams longer than
`max_seq_len` are cut into overlapping windows (never truncated); a window's loss mask only
covers tokens no earlier window predicted, so overlap adds context without counting a token
twice. Near-duplicate chunks (MinHash over token 4-grams, Jaccard ≥ 0.8) are dropped; the
train/validation split is by document, so no document leaks across it.

This module knows nothing about models or MLX: it yields numpy arrays.
"""

from __future__ import annotations

import html
import html.parser
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import TrainingError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".html", ".htm", ".docx", ".jsonl")
DEDUP_THRESHOLD = 0.8
_SHINGLE = 4


# --------------------------------------------------------------------------------------------
# Records and report


@dataclass
class Example:
    """One training chunk: `tokens` (int32, ≤ max_seq_len) and `mask` (bool, same length).

    `mask[i]` says token i is a prediction target (predicted from tokens[:i]); mask[0] is False.
    """

    tokens: np.ndarray
    mask: np.ndarray
    source: str

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    max_seq_len: int

    def __len__(self) -> int:
        return len(self.train)


@dataclass
class DataReport:
    folder: str
    max_seq_len: int
    files_read: list[str] = field(default_factory=list)
    files_skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    documents: int = 0
    train_documents: int = 0
    val_documents: int = 0
    tokens: int = 0  # tokens over all documents, before chunking
    train_tokens: int = 0  # loss-bearing tokens in the train chunks
    val_tokens: int = 0
    chunks: int = 0
    train_chunks: int = 0
    val_chunks: int = 0
    duplicates_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"data: {self.folder}",
            f"  files read: {len(self.files_read)}, skipped: {len(self.files_skipped)}",
        ]
        lines += [f"    skipped {p}: {why}" for p, why in self.files_skipped]
        lines += [
            f"  documents: {self.documents} ({self.train_documents} train, {self.val_documents} validation)",
            f"  tokens: {self.tokens}; chunks of ≤ {self.max_seq_len}: {self.chunks} "
            f"({self.train_chunks} train, {self.val_chunks} validation), "
            f"{self.duplicates_removed} near-duplicates removed",
            f"  trained tokens per epoch: {self.train_tokens}; validation tokens: {self.val_tokens}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Doc:
    source: str
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


class _Skip(Exception):
    """A file (or JSONL line) that cannot be used; the message is the reason."""


# --------------------------------------------------------------------------------------------
# Cleaning and readers

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def clean_text(text: str, *, reflow: bool = False) -> str:
    """Unicode NFC, no control characters, no trailing blanks, at most one empty line in a row.

    `reflow` (PDF and HTML text) also joins words hyphenated across lines and collapses runs of
    spaces, which those extractors produce but hand-written text may mean (code, tables).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ")
    text = _CONTROL.sub("", text)
    if reflow:
        text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)
        text = re.sub(r"[ \t]{2,}", " ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _decode_bytes(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    head = data[:8192]
    if b"\x00" in head:
        raise _Skip("binary file (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="replace")
    bad = sum(1 for c in text[:8192] if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\f"))
    if bad > 0.02 * max(1, min(len(text), 8192)):
        raise _Skip("binary file (not text in UTF-8 or cp1252)")
    return text


def _read_text(path: Path) -> str:
    return _decode_bytes(path.read_bytes())


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise _Skip("encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except _Skip:
        raise
    except Exception as e:  # pypdf raises many kinds for damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Skip(f"unreadable PDF ({reason})") from None
    text = "\n\n".join(pages)
    if not text.strip():
        raise _Skip("PDF has no extractable text (scanned images?)")
    return text


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: no script/style/head, a line break after block elements."""

    _HIDDEN = {"script", "style", "head", "noscript", "template", "svg"}
    _BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "section",
        "article",
        "pre",
        "blockquote",
        "table",
        "ul",
        "ol",
        "hr",
        "header",
        "footer",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def _read_html(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(_decode_bytes(path.read_bytes()))
    parser.close()
    text = "".join(parser.parts)
    # Inside a block, source line breaks are just spaces.
    return "\n".join(re.sub(r"\s+", " ", html.unescape(p)).strip() for p in text.split("\n"))


def _read_docx(path: Path) -> str:
    try:
        import docx

        document = docx.Document(str(path))
    except Exception as e:
        raise _Skip(f"unreadable .docx ({type(e).__name__})") from None
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text for cell in row.cells))
    return "\n".join(parts)


def _read_jsonl(path: Path, report: DataReport) -> list[_Doc]:
    docs: list[_Doc] = []
    bad: list[str] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(f"line {n}: not JSON")
            continue
        if not isinstance(record, dict):
            bad.append(f"line {n}: not a JSON object")
        elif isinstance(record.get("messages"), list):
            msgs = record["messages"]
            if all(
                isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)
                for m in msgs
            ):
                docs.append(_Doc(where, messages=msgs))
            else:
                bad.append(f"line {n}: messages need 'role' and string 'content'")
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            msgs = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
            docs.append(_Doc(where, messages=msgs))
        elif isinstance(record.get("text"), str):
            docs.append(_Doc(where, text=record["text"]))
        else:
            bad.append(f"line {n}: no 'text', 'prompt'+'completion' or 'messages' key")
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        report.notes.append(f"{path}: {len(bad)} JSONL lines skipped: {'; '.join(bad[:3])}{more}")
    if not docs:
        raise _Skip("no usable JSONL records")
    return docs


def read_folder(folder: Path, report: DataReport) -> list[_Doc]:
    """Every usable document under `folder` (sorted by path, so runs are reproducible)."""
    docs: list[_Doc] = []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        rel = str(path.relative_to(folder))
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # hidden files and folders (.DS_Store, .git)
        suffix = path.suffix.lower()
        try:
            if suffix not in SUFFIXES:
                raise _Skip(f"unsupported file type {suffix or '(none)'}")
            if suffix == ".jsonl":
                found = _read_jsonl(path, report)
                for d in found:
                    d.source = d.source.replace(str(path), rel)
            else:
                if suffix == ".pdf":
                    text = clean_text(_read_pdf(path), reflow=True)
                elif suffix in (".html", ".htm"):
                    text = clean_text(_read_html(path), reflow=True)
                elif suffix == ".docx":
                    text = clean_text(_read_docx(path))
                else:
                    text = clean_text(_read_text(path))
                if not text:
                    raise _Skip("no text")
                found = [_Doc(rel, text=text)]
        except _Skip as e:
            report.files_skipped.append((rel, str(e)))
            continue
        except OSError as e:
            report.files_skipped.append((rel, f"cannot read ({e.strerror or e})"))
            continue
        report.files_read.append(rel)
        docs.extend(found)
    return docs


# --------------------------------------------------------------------------------------------
# Tokenization


def eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        ids = getattr(tokenizer, "eos_ids", None) or ()
        if not ids:
            raise TrainingError("the tokenizer has no EOS token; cannot mark document ends")
        eos = min(ids)
    return int(eos)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_document(doc: _Doc, tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one document; mask[i] True where token i is trained on."""
    if doc.text is not None:
        eos = eos_token_id(tokenizer)
        ids = list(tokenizer.encode(clean_text(doc.text), add_special_tokens=True))
        if not ids or ids[-1] != eos:
            ids.append(eos)
        return ids, [False] + [True] * (len(ids) - 1)

    msgs = [{"role": m["role"], "content": m["content"]} for m in doc.messages or []]
    full = tokenizer.encode(
        tokenizer.apply_chat_template(msgs, add_generation_prompt=False), add_special_tokens=False
    )
    mask = [False] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        # The assistant turn is what the conversation up to it (with the generation prompt)
        # lacks compared with the conversation including it.
        before = (
            tokenizer.encode(
                tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True),
                add_special_tokens=False,
            )
            if i
            else []
        )
        upto = tokenizer.encode(
            tokenizer.apply_chat_template(msgs[: i + 1], add_generation_prompt=False),
            add_special_tokens=False,
        )
        start = _common_prefix(before, full)
        end = _common_prefix(upto, full)
        for j in range(start, end):
            mask[j] = True
    return list(full), mask


def chunk_document(
    ids: list[int], mask: list[bool], max_seq_len: int, overlap: int, source: str
) -> list[Example]:
    """Overlapping windows of ≤ max_seq_len tokens; each target token belongs to one window."""
    n = len(ids)
    arr, m = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)
    if n <= max_seq_len:
        return [Example(arr, m.copy(), source)] if m[1:].any() else []
    stride = max_seq_len - overlap
    out: list[Example] = []
    covered = 0  # tokens [0, covered) have been predicted (or are not targets)
    start = 0
    while covered < n:
        start = min(start, n - max_seq_len)  # the last window ends exactly at the document end
        end = start + max_seq_len
        cm = m[start:end].copy()
        cm[: max(0, covered - start)] = False
        cm[0] = False
        if cm.any():
            out.append(Example(arr[start:end].copy(), cm, source))
        covered = end
        start += stride
    return out


# --------------------------------------------------------------------------------------------
# Near-duplicate removal (MinHash + banded LSH, then an exact Jaccard check)

_P = (1 << 61) - 1
_N_HASH, _BANDS = 32, 8


def _shingles(tokens: np.ndarray) -> np.ndarray:
    t = tokens.astype(np.uint64)
    if len(t) < _SHINGLE:
        return np.unique(t)
    h = np.zeros(len(t) - _SHINGLE + 1, dtype=np.uint64)
    for k in range(_SHINGLE):
        h = h * np.uint64(1_000_003) + t[k : len(t) - _SHINGLE + 1 + k]
    return np.unique(h)


def dedup(examples: list[Example]) -> tuple[list[Example], int]:
    """Drop chunks whose token-4-gram Jaccard similarity with an earlier chunk is ≥ 0.8."""
    rng = np.random.default_rng(1234)
    a = rng.integers(1, 1 << 31, size=(_N_HASH, 1), dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=(_N_HASH, 1), dtype=np.uint64)
    rows = _N_HASH // _BANDS
    buckets: dict[tuple, list[int]] = {}
    kept: list[Example] = []
    kept_sets: list[set] = []
    removed = 0
    for ex in examples:
        sh = _shingles(ex.tokens)
        sig = ((a * (sh[None, :] & np.uint64(0x7FFFFFFF)) + b) % np.uint64(2_147_483_647)).min(
            axis=1
        )
        keys = [(band, *sig[band * rows : (band + 1) * rows].tolist()) for band in range(_BANDS)]
        cand = {i for k in keys for i in buckets.get(k, ())}
        s = set(sh.tolist())
        if any(
            len(s & kept_sets[i]) / max(1, len(s | kept_sets[i])) >= DEDUP_THRESHOLD for i in cand
        ):
            removed += 1
            continue
        idx = len(kept)
        kept.append(ex)
        kept_sets.append(s)
        for k in keys:
            buckets.setdefault(k, []).append(idx)
    return kept, removed


# --------------------------------------------------------------------------------------------
# The entry point


def build_dataset(
    folder: str | Path,
    tokenizer,
    max_seq_len: int,
    overlap: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    context_length: int | None = None,
) -> tuple[Dataset, DataReport]:
    """Read `folder`, tokenize, chunk, dedup and split it; raise TrainingError if nothing is usable.

    `overlap` defaults to max_seq_len // 8 tokens; `context_length` (the model's) bounds max_seq_len.
    """
    folder = Path(folder).expanduser()
    if context_length is not None and max_seq_len > context_length:
        raise TrainingError(
            f"max_seq_len {max_seq_len} is above the model's context length {context_length}"
        )
    if max_seq_len < 2:
        raise TrainingError(f"max_seq_len must be at least 2, got {max_seq_len}")
    overlap = max_seq_len // 8 if overlap is None else int(overlap)
    if not 0 <= overlap < max_seq_len:
        raise TrainingError(f"overlap {overlap} must be ≥ 0 and below max_seq_len {max_seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise TrainingError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not folder.is_dir():
        raise TrainingError(f"{folder}: not a folder")

    report = DataReport(folder=str(folder), max_seq_len=max_seq_len)
    docs = read_folder(folder, report)
    if not docs:
        if not report.files_skipped:
            raise TrainingError(
                f"{folder}: no documents found (empty folder); supported: {', '.join(SUFFIXES)}"
            )
        reasons = "; ".join(f"{p}: {r}" for p, r in report.files_skipped[:5])
        raise TrainingError(f"{folder}: no usable documents ({reasons})")

    streams = []
    for doc in docs:
        ids, mask = tokenize_document(doc, tokenizer)
        report.tokens += len(ids)
        if sum(mask[1:]) == 0:
            report.notes.append(f"{doc.source}: nothing to train on (no assistant turn or text)")
            continue
        streams.append((doc.source, ids, mask))
    if not streams:
        raise TrainingError(f"{folder}: the documents hold no trainable tokens")
    report.documents = len(streams)

    order = list(range(len(streams)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if val_fraction > 0 and len(streams) >= 2:
        n_val = min(len(streams) - 1, max(1, round(len(streams) * val_fraction)))
    elif val_fraction > 0:
        report.notes.append("only one document: no validation split (validation uses nothing)")
    val_idx = set(order[:n_val])

    train_ex: list[Example] = []
    val_ex: list[Example] = []
    for i, (source, ids, mask) in enumerate(streams):
        chunks = chunk_document(ids, mask, max_seq_len, overlap, source)
        (val_ex if i in val_idx else train_ex).extend(chunks)
    n_before = len(train_ex) + len(val_ex)
    kept, report.duplicates_removed = dedup(train_ex + val_ex)
    kept_ids = {id(e) for e in kept}
    train_ex = [e for e in train_ex if id(e) in kept_ids]
    val_ex = [e for e in val_ex if id(e) in kept_ids]  # a val chunk duplicating train is dropped
    assert len(train_ex) + len(val_ex) == n_before - report.duplicates_removed

    report.train_documents = len(streams) - n_val
    report.val_documents = n_val
    report.train_chunks, report.val_chunks = len(train_ex), len(val_ex)
    report.chunks = len(train_ex) + len(val_ex)
    report.train_tokens = sum(e.n_targets for e in train_ex)
    report.val_tokens = sum(e.n_targets for e in val_ex)
    if not train_ex:
        raise TrainingError(
            f"{folder}: every chunk was a duplicate or held out; nothing to train on"
        )
    return Dataset(train_ex, val_ex, max_seq_len), report


def collate(examples: list[Example], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask) of shape (B, L-1), right-padded to the longest example."""
    length = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), length), dtype=bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = e.tokens
        mask[i, : len(e.mask)] = e.mask
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
