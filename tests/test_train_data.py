"""Documents → training chunks: every supported format is read (PDF, HTML, DOCX, text, the three
JSONL formats), bad files are skipped with their reason while the rest is used, long documents
are windowed so each target token is trained exactly once (never truncated), near-duplicates are
dropped, the split is by document, and chat data is trained on assistant turns only — checked on
the mask itself with the real SmolLM2 tokenizer and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import TrainingError
from engine.train.data import build_dataset, chunk_document, clean_text, collate


@pytest.fixture(scope="module")
def tok(default_model_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_path(default_model_path)


def write_pdf(path: Path, text: str) -> None:
    """A one-page PDF with `text` in Helvetica, written from the PDF 1.4 object syntax."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))


def make_folder(root: Path) -> Path:
    from docx import Document
    from pypdf import PdfReader, PdfWriter

    d = root / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text(
        "The lighthouse keeper Orvel counts exactly 412 steps every evening.\n"
    )
    (d / "sub" / "guide.md").write_text(
        "# Guide\n\nThe river Quenna flows north into Lake Brimm.\n\n\n\n"
    )
    (d / "page.html").write_text(
        "<html><head><title>T</title><style>body{color:red}</style></head><body>"
        "<script>var secret = 'SCRIPTTEXT';</script><p>Marlow &amp; Sons bake"
        " bread</p><div>at dawn.</div></body></html>"
    )
    doc = Document()
    doc.add_paragraph("The glassblower Ines uses blue sand from Kettle Bay.")
    doc.save(str(d / "letter.docx"))
    write_pdf(d / "report.pdf", "Copper wire from Dunmore hums at night.")
    writer = PdfWriter()
    writer.append(PdfReader(str(d / "report.pdf")))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    with open(d / "locked.pdf", "wb") as f:
        writer.write(f)
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    (d / "blob.txt").write_bytes(bytes(range(256)) * 8)
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    lines = [
        {"text": "Plain record: the comet Velis returns every 31 years."},
        {"prompt": "Where does Velis return?", "completion": "To the inner system."},
        {
            "messages": [
                {"role": "user", "content": "Name the keeper."},
                {"role": "assistant", "content": "Orvel keeps the light."},
            ]
        },
        "not json",
    ]
    (d / "data.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    )
    return d


def test_reads_every_format_and_skips_bad_files_with_reasons(tmp_path, tok):
    folder = make_folder(tmp_path)
    ds, rep = build_dataset(folder, tok, max_seq_len=64, val_fraction=0.0)
    assert sorted(rep.files_read) == sorted(
        ["notes.txt", "sub/guide.md", "page.html", "letter.docx", "report.pdf", "data.jsonl"]
    )
    skipped = dict(rep.files_skipped)
    assert "encrypted" in skipped["locked.pdf"]
    assert "unreadable PDF" in skipped["broken.pdf"]
    assert "binary" in skipped["blob.txt"]
    assert "unsupported" in skipped["image.png"]
    assert any("1 JSONL lines skipped" in n for n in rep.notes)
    assert rep.documents == 5 + 3  # five files + three JSONL records
    text = "\n".join(tok.decode(e.tokens.tolist()) for e in ds.train)
    for fact in (
        "412 steps",
        "Lake Brimm",
        "Marlow & Sons bake bread",
        "Kettle Bay",
        "Dunmore hums",
        "every 31 years",
        "Orvel keeps the light",
    ):
        assert fact in text, fact
    assert "SCRIPTTEXT" not in text and "color:red" not in text
    assert rep.chunks == len(ds.train) and rep.tokens >= sum(len(e.tokens) for e in ds.train)
    assert all(len(e.tokens) <= 64 for e in ds.train)
    summary = rep.summary()
    assert "locked.pdf" in summary and "documents: 8" in summary


def test_documents_end_with_eos_and_short_ones_are_kept(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Hi.")
    ds, rep = build_dataset(tmp_path, tok, max_seq_len=128, val_fraction=0.0)
    (ex,) = ds.train
    ids = tok.encode("Hi.", add_special_tokens=True)
    assert ex.tokens.tolist() == ids + [min(tok.eos_ids)]
    assert not ex.mask[0] and ex.mask[1:].all()


def test_long_documents_are_windowed_with_every_target_trained_once():
    ids = list(range(1000, 1000 + 301))
    chunks = chunk_document(ids, [False] + [True] * 300, max_seq_len=64, overlap=16, source="x")
    counts = np.zeros(301, dtype=int)
    for c in chunks:
        assert len(c.tokens) <= 64 and not c.mask[0]
        start = int(c.tokens[0]) - 1000
        assert c.tokens.tolist() == ids[start : start + len(c.tokens)]  # contiguous, in order
        counts[start + np.nonzero(c.mask)[0]] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()
    # overlap gives later windows context: every window after the first starts 16+ tokens early
    assert all(int(c.tokens[np.argmax(c.mask)]) - int(c.tokens[0]) >= 16 for c in chunks[1:])


def test_collate_shifts_and_pads():
    from engine.train.data import Example

    a = Example(np.array([5, 6, 7, 8], np.int32), np.array([0, 1, 1, 1], bool), "a")
    b = Example(np.array([9, 10], np.int32), np.array([0, 1], bool), "b")
    x, y, m = collate([a, b], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [9, 10, 0]]  # padding after 10 is never a target
    assert y.tolist() == [[6, 7, 8], [10, 0, 0]]
    assert m.tolist() == [[True, True, True], [True, False, False]]


def test_near_duplicates_removed_and_split_is_by_document(tmp_path, tok):
    base = " ".join(
        f"Line {i} of the almanac records weather in the valley of Sorn." for i in range(30)
    )
    (tmp_path / "orig.txt").write_text(base)
    (tmp_path / "copy.txt").write_text(base)
    (tmp_path / "near.txt").write_text(base.replace("Line 7 ", "Row 7 "))
    for i in range(6):
        (tmp_path / f"other{i}.txt").write_text(
            f"Document {i}: "
            + " ".join(f"the number {i * 100 + j} is written here." for j in range(40))
        )
    ds, rep = build_dataset(tmp_path, tok, max_seq_len=512, val_fraction=0.3, seed=1)
    assert rep.duplicates_removed == 2
    sources_train = {e.source for e in ds.train}
    sources_val = {e.source for e in ds.val}
    assert sources_val and not (sources_train & sources_val)
    assert rep.val_documents == 3 and rep.train_documents == 6
    decoded = [tok.decode(e.tokens.tolist()) for e in ds.train + ds.val]
    assert sum("valley of Sorn" in t for t in decoded) == 1


def test_chat_mask_covers_assistant_turns_only(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What colour is the sky on Pell?"},
        {"role": "assistant", "content": "Violet at noon."},
        {"role": "user", "content": "And at night?"},
        {"role": "assistant", "content": "Deep green."},
    ]
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": msgs})
        + "\n"
        + json.dumps({"prompt": "Capital of Pell?", "completion": "Marrow City."})
    )
    ds, _ = build_dataset(tmp_path, tok, max_seq_len=256, val_fraction=0.0)
    assert len(ds.train) == 2
    runs_by_doc = []
    for ex in ds.train:
        full = tok.decode(ex.tokens.tolist())
        runs, cur = [], []
        for t, m in zip(ex.tokens.tolist(), ex.mask.tolist()):
            if m:
                cur.append(t)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        if cur:
            runs.append(tok.decode(cur))
        masked = "".join(runs)
        others = [m["content"] for m in msgs if m["role"] != "assistant"] + ["Capital of Pell?"]
        assert any(c in full for c in others)  # the context is in the sequence ...
        assert not any(c in masked for c in others)  # ... but never a target
        assert "system" not in masked and "user" not in masked
        runs_by_doc.append(runs)
    chat_runs, comp_runs = sorted(runs_by_doc, key=len, reverse=True)
    end = tok.decode([min(tok.eos_ids)])
    assert [r.strip() for r in chat_runs] == [f"Violet at noon.{end}", f"Deep green.{end}"]
    assert [r.strip() for r in comp_runs] == [f"Marrow City.{end}"]


def test_bad_input_is_a_clear_error(tmp_path, tok):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match="empty folder"):
        build_dataset(empty, tok, max_seq_len=64)
    with pytest.raises(TrainingError, match="not a folder"):
        build_dataset(tmp_path / "missing", tok, max_seq_len=64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(TrainingError, match="no usable documents.*binary"):
        build_dataset(bad, tok, max_seq_len=64)
    (bad / "ok.txt").write_text("Fine text.")
    with pytest.raises(TrainingError, match="above the model's context length 8192"):
        build_dataset(bad, tok, max_seq_len=10000, context_length=8192)


def test_clean_text():
    raw = "Intro\r\n\r\n\r\n\r\nwords  with\u00a0nbsp and hy-\nphen\x07 end   \n"
    assert clean_text(raw) == "Intro\n\nwords  with nbsp and hy-\nphen end"
    assert clean_text(raw, reflow=True) == "Intro\n\nwords with nbsp and hyphen end"
