"""`latent finetune` end to end on a tiny model: progress, the before/after perplexity table, the
adapter folder, and `--export`: the standalone fused folder loads on its own and gives the same
logits as base + adapter (1e-4). Bad input ends in one `error:` line and exit status 1.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from test_train_trainer import corpus, make_tiny_model  # tests/ is on sys.path under pytest

from app.cli import main


def test_finetune_command_trains_reports_and_exports(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    texts = corpus(8)
    for i, t in enumerate(texts):
        (data / f"d{i}.md").write_text(t)
    model = make_tiny_model(tmp_path / "model", texts)
    rc = main(
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data),
            "--steps",
            "8",
            "--lr",
            "1e-2",
            "--max-seq-len",
            "64",
            "--eval-every",
            "4",
            "--val-fraction",
            "0.25",
            "--out",
            str(tmp_path / "ad"),
            "--run-dir",
            str(tmp_path / "run"),
            "--export",
            str(tmp_path / "fused"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "files read: 8" in err and "8/8 loss" in err
    assert "perplexity on validation" in out and "before" in out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("standalone model written to")
    row = lines[-2].split()
    before, after = float(row[0]), float(row[1])
    assert after < before and row[2].endswith("%")
    assert (tmp_path / "ad" / "adapters.safetensors").is_file()

    import engine

    adapted = engine.load(model, adapter=tmp_path / "ad")
    fused = engine.load(tmp_path / "fused")
    assert fused.tokenizer.encode("Ada has 3 kites.") == adapted.tokenizer.encode(
        "Ada has 3 kites."
    )
    x = mx.array([adapted.tokenizer.encode("Bo has 4 maps. Cy has")])
    np.testing.assert_allclose(np.array(fused.model(x)), np.array(adapted.model(x)), atol=1e-4)


def test_finetune_bad_input_is_one_error_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = make_tiny_model(tmp_path / "model", corpus(2))
    common = [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(empty),
        "--out",
        str(tmp_path / "o"),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert main(common + ["--max-seq-len", "1024"]) == 1
    assert (
        "error: max_seq_len 1024 is above the model's context length 256" in capsys.readouterr().err
    )
    rc = main(common)
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error:") and "empty folder" in err
    assert "Traceback" not in err
