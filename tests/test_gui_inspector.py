"""The Inspector view on a real (tiny, random) teaching model with a character tokenizer:
"Check the math" runs `engine.inspect.check_math` on the engine thread and shows one row per
residual-stream state, the final norm and the logits, equal to what check_math reports, with the
overall max-abs line; when engine and reference disagree (the reference told another norm
epsilon) the view says the tolerance is exceeded. "Look at a prompt" labels the attention map's
axes with the prompt's tokens, and for an MoE model fills the expert-routing grid (tokens ×
MoE layers) with the router's choices, coloured by the first choice; a dense model hides it."""

from __future__ import annotations

import pytest
from fake_engine import TeachingEngine, make_window

pytestmark = pytest.mark.gui

PROMPT = "hello, mixture"


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    return latent_home


def check(qtbot, win, prompt: str = PROMPT) -> dict:
    panel = win.views["inspector"].math_panel
    panel.prompt.setText(prompt)
    with qtbot.waitSignal(win.client.checked, timeout=30000) as sig:
        panel.button.click()
    return sig.args[0]


def test_check_the_math_table(qtbot, tmp_path):
    eng = TeachingEngine(n_layers=3)
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    win.show_view("inspector")
    result = check(qtbot, win)
    panel = win.views["inspector"].math_panel
    m = panel.model
    names = [m.index(i, 0).data() for i in range(m.rowCount())]
    assert names == ["embeddings", "layer 0", "layer 1", "layer 2", "final norm", "logits"]
    from engine.inspect import check_math

    direct = check_math(eng.loaded, PROMPT)  # the same computation, asked directly
    assert [r.name for r in direct.rows] == names
    for i, r in enumerate(direct.rows):
        assert float(m.index(i, 1).data()) == pytest.approx(r.max_abs, rel=1e-2, abs=1e-12)
    assert result["ok"] and result["max_abs"] < 1e-4 and result["n_tokens"] == len(PROMPT)
    assert f"max abs difference: {result['max_abs']:.6e}" in panel.summary.text()
    assert "within tolerance" in panel.summary.text()
    win.shutdown()


def test_check_the_math_can_fail(qtbot, tmp_path, monkeypatch):
    import engine.inspect as ins

    real = ins.reference_config
    monkeypatch.setattr(ins, "reference_config", lambda loaded: {**real(loaded), "norm_eps": 0.5})
    win = make_window(qtbot, tmp_path / "c.sqlite", TeachingEngine(n_layers=2))
    result = check(qtbot, win)
    assert not result["ok"]
    panel = win.views["inspector"].math_panel
    assert "exceeds the tolerance" in panel.summary.text()
    red = [panel.model.index(i, 0).data(9) for i in range(panel.model.rowCount())]  # Foreground
    assert any(b is not None for b in red)
    win.shutdown()


def look(qtbot, win, prompt: str = PROMPT) -> dict:
    panel = win.views["inspector"].look_panel
    panel.prompt.setText(prompt)
    with qtbot.waitSignal(win.client.looked, timeout=30000) as sig:
        panel.button.click()
    assert "error" not in sig.args[0], sig.args[0]
    return sig.args[0]


def test_routing_grid_and_token_axes(qtbot, tmp_path):
    eng = TeachingEngine(n_layers=3, ffn="moe")
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    win.show_view("inspector")
    win.views["inspector"].tabs.setCurrentIndex(1)
    result = look(qtbot, win)
    panel = win.views["inspector"].look_panel
    # attention axes: one tick per prompt character, at the pixel centre
    ticks = panel.plot.getAxis("bottom")._tickLevels[0]
    assert [t for _, t in ticks] == [
        "h",
        "e",
        "l",
        "l",
        "o",
        ",",
        "␣",
        "m",
        "i",
        "x",
        "t",
        "u",
        "r",
        "e",
    ]
    assert [p for p, _ in ticks] == [i + 0.5 for i in range(len(PROMPT))]
    # routing grid: tokens × the 3 MoE layers, each cell the router's top-2 from `look`
    grid = panel.routing
    assert grid.isVisible()
    m = grid.model
    assert (m.rowCount(), m.columnCount()) == (len(PROMPT), 3) and m.n_experts == 6
    for col, layer in enumerate(sorted(result["router"])):
        ids, weights = result["router"][layer]
        for row in range(len(PROMPT)):
            assert m.index(row, col).data() == f"{ids[row][0]} · {ids[row][1]}"
            assert m.index(row, col).data(256) == int(ids[row][0])  # UserRole: first choice
            assert 0 <= ids[row][0] < 6 and ids[row][0] != ids[row][1]
            assert weights[row].sum() == pytest.approx(1.0, abs=1e-5)  # renormalised top-k
    colours = {m.index(r, c).data(8).color().name() for r in range(len(PROMPT)) for c in range(3)}
    firsts = {
        int(result["router"][k][0][r][0]) for k in result["router"] for r in range(len(PROMPT))
    }
    assert len(colours) == len(firsts)  # one colour per expert id
    win.shutdown()


def test_dense_model_hides_routing(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", TeachingEngine(n_layers=2, ffn="dense"))
    win.show_view("inspector")
    win.views["inspector"].tabs.setCurrentIndex(1)
    result = look(qtbot, win, "abc")
    assert result["router"] == {}
    assert not win.views["inspector"].look_panel.routing.isVisible()
    win.shutdown()
