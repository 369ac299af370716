"""`python -m app.gui.screenshots docs/screenshots`: a PNG of each view for the README.

Runs offscreen in a throwaway LATENT_HOME: the chat mid-reply over the test fake engine (canned
tokens, so the picture is the same every time), the library and downloads against the local
test Hub server, the fine-tune view with a real dataset report, and the inspector on the real
default model when the engine is there. Nothing here is used by the app itself.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CANNED = (
    "LoRA fine-tunes a model by learning a **low-rank update** for a few weight matrices "
    "instead of changing all of them:\n\n"
    "- the base weights stay frozen (and may stay quantized),\n"
    "- each adapted layer adds `B @ A` with rank *r* ≪ d,\n"
    "- only a few MB are saved.\n\n"
    "```python\nclass LoRALinear(nn.Module):\n    def __call__(self, x):\n"
    "        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T\n```\n\n"
    "With rank 8 on SmolLM2-135M that is under 1% of the parameters."
)


def _tokens(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        word += ch
        if ch in " \n":
            out.append(word)
            word = ""
    return out + ([word] if word else [])


def _wait(app, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def _wait_until(app, cond, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.02)
    return False


def main(out_dir: str = "docs/screenshots") -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    home = Path(tempfile.mkdtemp(prefix="latent-shots-"))
    real_models = Path.home() / ".local/share/latent-studio/models"
    os.environ["LATENT_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "hf-cache")
    if real_models.exists():
        os.environ["LATENT_MODELS_DIR"] = str(real_models)
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_engine import FakeEngine
    from PySide6.QtWidgets import QTabWidget

    from app.gui.main import make_app
    from app.gui.main_window import MainWindow
    from app.store import Store

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = make_app()
    server = _start_hub()

    def shot(widget, name: str) -> None:
        _wait(app, 0.3)
        widget.grab().save(str(out / f"{name}.png"))
        print(f"saved {out / name}.png")

    # first run
    win0 = MainWindow(store=Store(home / "first.sqlite"), engine_factory=FakeEngine, autoload=False)
    win0.resize(1200, 760)
    win0.show()
    win0.chat.set_welcome(win0.welcome)
    shot(win0, "welcome")
    win0.shutdown()
    win0.close()

    # chat mid-reply
    eng = FakeEngine(tokens=_tokens(CANNED), delay=0.04, numbered=False)
    store = Store(home / "chats.sqlite")
    for title, q, a in (
        (
            "Packing list for Lisbon",
            "What should I pack for 3 days in Lisbon in May?",
            "Light layers, comfortable shoes for the hills, and a light rain jacket.",
        ),
        ("Regex for dates", "A regex for ISO dates?", "`^\\d{4}-\\d{2}-\\d{2}$`"),
    ):
        c = store.create_conversation(title)
        store.add_message(c.id, "user", q)
        store.add_message(
            c.id,
            "assistant",
            a,
            {"generated_tokens": 18, "decode_tps": 41.0, "ttft_s": 0.09, "finish_reason": "stop"},
        )
    win = MainWindow(store=store, engine_factory=lambda: eng, autoload=False)
    win.resize(1280, 800)
    win.show()
    win.load_model(str(real_models / "SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"))
    _wait_until(app, lambda: win.client.info is not None)
    win.chat.new_conversation()
    win.chat.system_prompt.setPlainText("You are a concise ML tutor.")
    win.chat.composer.setPlainText("Explain LoRA in a few lines.")
    win.chat.send()
    _wait_until(app, lambda: len(win.chat.stream_text) > len(CANNED) * 0.8)
    shot(win, "chat")
    from app.gui.theme import apply_theme

    apply_theme(app, "dark")
    shot(win, "chat-dark")
    apply_theme(app, "light")
    win.chat.stop()
    _wait_until(app, lambda: not win.client.generating)

    # settings, with the model served over the local API
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8080))
            port = 8080
        except OSError:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    win.store.set_setting("serve_port", port)
    win.views["settings"].serve_port.setValue(port)
    win.set_serving(True)
    _wait_until(app, lambda: win.server.running)
    win.show_view("settings")
    shot(win, "settings")
    win.set_serving(False)
    _wait_until(app, lambda: not win.server.active)

    # library + downloads against the test Hub
    if server is not None:
        win.show_view("library")
        lib = win.views["library"]
        lib.query.setText("SmolLM")
        lib.search()
        _wait_until(app, lambda: lib.results.rowCount() > 0)
        lib.results_view.selectRow(1)
        _wait_until(app, lambda: lib.variants.rowCount() > 0)
        lib.variants_view.selectRow(0)
        shot(win, "library")
        dl = win.views["downloads"]
        repo = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
        server.slow[(repo, "smollm2-135m-instruct-q8_0.gguf")] = 0.01
        lib.enqueue("HuggingFaceTB/SmolLM2-360M-Instruct-GGUF", None)
        _wait_until(app, lambda: any(j.status == "done" for j in dl.model.rows))
        lib.enqueue(repo, ["smollm2-135m-instruct-q8_0.gguf"])
        win.show_view("downloads")
        _wait_until(
            app,
            lambda: any(j.status == "running" and j.bytes_done > 300_000 for j in dl.model.rows),
        )
        dl.refresh()
        shot(win, "downloads")
        win.banner.hide()

    # fine-tune: a real (short) LoRA run of a tiny llama on a generated corpus
    win.show_view("finetune")
    ft = win.views["finetune"]
    try:
        from test_train_trainer import corpus, make_tiny_model

        texts = corpus(16)
        data = home / "notes"
        data.mkdir()
        for i, t in enumerate(texts):
            (data / f"note{i:02d}.txt").write_text(t)
        tiny = make_tiny_model(home / "tiny-llama", texts)
        win.load_model(str(tiny))
        _wait_until(app, lambda: (win.client.info or {}).get("path") == str(tiny))
        ft.folder.setText(str(data))
        for key, v in {
            "epochs": 4.0,
            "lr": 1e-2,
            "batch_size": 4,
            "max_seq_len": 64,
            "val_fraction": 0.25,
            "eval_every": 3,
        }.items():
            ft.hyper[key].setValue(v)
        ft.start()
        _wait_until(app, lambda: ft.task is None, timeout=300)
    except Exception as e:  # noqa: BLE001 - the trainer may be missing: show the report only
        print(f"fine-tune run skipped: {e}")
        ft.folder.setText(str(ROOT / "docs"))
        ft.preview()
        _wait_until(app, lambda: "documents" in ft.report.toPlainText(), timeout=60)
    shot(win, "finetune")
    win.shutdown()
    win.close()

    # inspector on the real model when the engine is there
    try:
        import engine.session  # noqa: F401

        factory = None
    except ImportError:
        factory = FakeEngine
    kw = {} if factory is None else {"engine_factory": factory}
    win2 = MainWindow(store=Store(home / "inspect.sqlite"), autoload=False, **kw)
    win2.resize(1280, 800)
    win2.show()
    model = real_models / "SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    win2.load_model(str(model))
    _wait_until(app, lambda: win2.client.info is not None, timeout=180)
    win2.show_view("inspector")
    ins = win2.views["inspector"]
    _wait_until(app, lambda: ins.model.rowCount() > 0, timeout=60)
    shot(win2, "inspector")
    try:
        ins.findChild(QTabWidget).setCurrentIndex(1)
        ins.look_panel.prompt.setText("The capital of France is Paris. The capital of Italy is")
        ins.look_panel.run()
        _wait_until(app, lambda: bool(ins.look_panel.result), timeout=60)
        ins.look_panel.layer.setValue(10)
        shot(win2, "inspector-look")
    except Exception as e:  # noqa: BLE001 - engine.inspect missing
        print(f"inspector look skipped: {e}")
    try:
        ins.tabs.setCurrentIndex(2)
        ins.math_panel.prompt.setText("The capital of France is")
        ins.math_panel.run()
        _wait_until(app, lambda: bool(ins.math_panel.result), timeout=180)
        shot(win2, "inspector-math")
    except Exception as e:  # noqa: BLE001
        print(f"inspector math skipped: {e}")
    win2.shutdown()
    win2.close()

    # expert routing on the (random, tiny) MoE teaching model
    from fake_engine import TeachingEngine

    win3 = MainWindow(
        store=Store(home / "moe.sqlite"),
        autoload=False,
        engine_factory=lambda: TeachingEngine(n_layers=6, ffn="moe"),
    )
    win3.resize(1280, 800)
    win3.show()
    win3.load_model("/fake/tiny-moe-teaching.gguf")
    _wait_until(app, lambda: win3.client.info is not None)
    win3.show_view("inspector")
    ins3 = win3.views["inspector"]
    ins3.tabs.setCurrentIndex(1)
    ins3.look_panel.prompt.setText("Mixture of experts!")
    ins3.look_panel.run()
    _wait_until(app, lambda: bool(ins3.look_panel.result), timeout=60)
    shot(win3, "inspector-routing")
    win3.shutdown()
    win3.close()
    if server is not None:
        server.stop()
    return 0


def _safetensors() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"model.embed_tokens.weight": np.zeros((256, 64), np.float16)})


def _start_hub():
    """The test Hub server with a few SmolLM2-like repos (random bytes; sizes are what matter)."""
    try:
        from hubserver import HubServer
    except ImportError:
        return None
    server = HubServer().start()
    os.environ["HF_ENDPOINT"] = server.url
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    blob = os.urandom(600_000)
    for repo, files, dl in (
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            {
                "smollm2-135m-instruct-q8_0.gguf": blob,
                "smollm2-135m-instruct-q4_k_m.gguf": blob[:350_000],
            },
            48_210,
        ),
        (
            "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
            {"smollm2-360m-instruct-q8_0.gguf": blob[:200_000]},
            21_500,
        ),
        (
            "HuggingFaceTB/SmolLM2-1.7B-Instruct",
            {"config.json": b'{"model_type": "llama"}', "model.safetensors": _safetensors()},
            310_000,
        ),
    ):
        server.add_repo(
            repo,
            files,
            downloads=dl,
            likes=dl // 100,
            tags=["gguf"] if "GGUF" in repo else ["safetensors"],
        )
    return server


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
