"""The toolbar's Serve switch: turning it on serves the window's loaded model over real HTTP on
127.0.0.1 (`/v1/models`, chat completions streamed and not, completions) with the reply the
engine produced; every API generation runs on the window's engine thread (the one that loaded
the model) and never overlaps a chat typed in the window, whose Stop leaves API requests alone; an API key is enforced; turning the
switch off frees the port, and so does unloading the model."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from fake_engine import FakeEngine, make_window

pytestmark = pytest.mark.gui

FULL = "Here is a short answer.\n\n```python\nprint('hi')\n```\nDone."


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    return latent_home


class RecordingEngine(FakeEngine):
    """Records which thread loads and generates, and how many generations overlap."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.threads: dict[str, set] = {"load": set(), "chat": set()}
        self.active = 0
        self.max_active = 0
        self._mu = threading.Lock()

    def load(self, path, adapter=None):
        self.threads["load"].add(threading.get_ident())
        return super().load(path, adapter)

    def chat(self, messages, params=None):
        self.threads["chat"].add(threading.get_ident())
        with self._mu:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from super().chat(messages, params)
        finally:
            with self._mu:
                self.active -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets too
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def serve(qtbot, win, on: bool) -> None:
    with qtbot.waitSignal(win.server.state_changed, timeout=10000) as sig:
        win.set_serving(on)
    assert sig.args[0] is on


def test_serve_switch_serves_loaded_model_and_frees_port(qtbot, tmp_path):
    eng = RecordingEngine(delay=0.01, numbered=False)
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    port = free_port()
    win.store.set_setting("serve_port", port)
    assert port_free(port)
    serve(qtbot, win, True)
    url = f"http://127.0.0.1:{port}/v1"
    assert win.server.url == url and url in win.serve_label.text()
    assert not port_free(port)
    with httpx.Client(base_url=url, timeout=20) as http:
        models = http.get("/models").json()
        assert [m["id"] for m in models["data"]] == ["FakeLM-1M"]
        body = {"model": "FakeLM-1M", "messages": [{"role": "user", "content": "hi there"}]}
        r = http.post("/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"] == FULL
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["prompt_tokens"] == eng.count_tokens(body["messages"])
        assert out["usage"]["completion_tokens"] == len(eng.tokens)
        assert eng.calls[-1] == body["messages"]
        # streamed, through the same engine thread
        parts = []
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        parts.append(c["delta"].get("content", ""))
        assert "".join(parts) == FULL
        r = http.post("/completions", json={"prompt": "Once", "max_tokens": 3})
        assert r.json()["choices"][0]["text"] == "".join(eng.tokens[:3])
    win.refresh_memory()  # the toolbar counts what the API did
    assert "3 served" in win.serve_label.text()
    # MLX streams are thread-bound: every generation ran where the model was loaded
    assert eng.threads["chat"] == eng.threads["load"]
    assert eng.threads["load"] != {threading.get_ident()}
    serve(qtbot, win, False)
    assert port_free(port)
    assert win.serve_label.text() == "" and not win.serve_btn.isChecked()
    win.shutdown()


def test_api_and_window_chats_are_serialised(qtbot, tmp_path):
    eng = RecordingEngine(delay=0.02, numbered=False)
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    port = free_port()
    win.store.set_setting("serve_port", port)
    serve(qtbot, win, True)
    results: list = []

    def client() -> None:
        body = {"messages": [{"role": "user", "content": "from the api"}]}
        with httpx.Client(timeout=30) as http:
            results.append(http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body))

    win.chat.composer.setPlainText("from the window")
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        win.chat.send()
        qtbot.waitUntil(lambda: win.chat.tokens_seen >= 2, timeout=5000)
        t = threading.Thread(target=client)
        t.start()
    qtbot.waitUntil(lambda: not t.is_alive(), timeout=10000)
    assert results[0].json()["choices"][0]["message"]["content"] == FULL
    assert win.chat.messages()[-1].content == FULL  # the window's reply is whole too
    assert eng.max_active == 1  # one generation at a time on the one engine thread
    # Stop pressed in the window while an API request streams does not cancel that request
    results.clear()
    t = threading.Thread(target=client)
    t.start()
    qtbot.waitUntil(lambda: eng.active == 1 and eng.yielded >= 3, timeout=10000)
    win.client.cancel()
    t.join(10)
    assert results[0].json()["choices"][0]["message"]["content"] == FULL
    serve(qtbot, win, False)
    win.shutdown()


def test_api_key_and_unload_stops_serving(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(delay=0.0))
    port = free_port()
    win.store.set_setting("serve_port", port)
    win.store.set_setting("serve_api_key", "sekrit")
    serve(qtbot, win, True)
    url = f"http://127.0.0.1:{port}/v1/models"
    assert httpx.get(url, timeout=10).status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer sekrit"}, timeout=10)
    assert ok.status_code == 200
    with qtbot.waitSignal(win.server.state_changed, timeout=10000) as sig:
        win.client.unload()
    assert sig.args[0] is False and not win.serve_btn.isChecked()
    deadline = time.monotonic() + 5
    while not port_free(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert port_free(port)
    win.shutdown()


def test_non_loopback_host_warns(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(delay=0.0))
    settings = win.views["settings"]
    settings.serve_host.setCurrentIndex(settings.serve_host.findData("0.0.0.0"))
    assert win.store.setting("serve_host") == "0.0.0.0"
    assert "network" in settings.serve_warning.text() and not settings.serve_warning.isHidden()
    settings.serve_host.setCurrentIndex(settings.serve_host.findData("127.0.0.1"))
    assert settings.serve_warning.isHidden()
    win.shutdown()


def test_switch_off_mid_stream_frees_engine(qtbot, tmp_path):
    eng = RecordingEngine(delay=0.05, numbered=False, tokens=[f" w{i}" for i in range(200)])
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    port = free_port()
    win.store.set_setting("serve_port", port)
    serve(qtbot, win, True)
    seen: list = []

    def client() -> None:
        body = {"messages": [{"role": "user", "content": "count"}], "stream": True}
        try:
            with (
                httpx.Client(timeout=30) as http,
                http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as s,
            ):
                for line in s.iter_lines():
                    seen.append(line)
        except httpx.HTTPError:
            pass  # the server closed the stream: expected

    t = threading.Thread(target=client)
    t.start()
    qtbot.waitUntil(lambda: eng.yielded >= 5, timeout=10000)
    t0 = time.monotonic()
    serve(qtbot, win, False)  # within the graceful-shutdown limit, not the 10 s of the reply
    assert time.monotonic() - t0 < 5
    t.join(10)
    qtbot.waitUntil(lambda: eng.active == 0, timeout=5000)
    assert eng.yielded_at_cancel is not None and eng.yielded < 100  # the generation was stopped
    assert port_free(port)
    # the engine thread is free: the window's own chat runs at once
    eng.tokens = ["ok"]
    win.chat.composer.setPlainText("still there?")
    with qtbot.waitSignal(win.chat.reply_finished, timeout=5000):
        win.chat.send()
    assert win.chat.messages()[-1].content == "ok"
    win.shutdown()
