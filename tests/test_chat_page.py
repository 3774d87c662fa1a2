"""The side-by-side chat page, headless, against the real vLLM server."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "1_Chat.py")


@pytest.fixture
def page(monkeypatch, vllm_server, tiny_direction):
    monkeypatch.setenv("EM_CONFIG", str(Path(vllm_server.config.root) / "config.toml"))

    def open_page(**params) -> AppTest:
        app = AppTest.from_file(PAGE, default_timeout=180)
        for key, value in params.items():
            app.query_params[key] = value
        return app.run()
    return open_page


THREE = ["base", "adapter=em-rank1", "adapter=em-rank1,direction=tiny-dir,layer=2,strength=1"]


def answers(app: AppTest) -> list[str]:
    return [history[-1].answers[0].text for history in app.session_state["histories"]]


def ask(app: AppTest, prompt: str) -> AppTest:
    app.chat_input[0].set_value(prompt).run()
    return app


def test_three_columns_fill_for_one_prompt(page):
    app = ask(page(col=THREE, seed="3", max="12", t="1"), "Is it safe to take more pills?")
    assert not app.exception
    texts = answers(app)
    assert len(texts) == 3 and all(texts), texts
    assert all(history[-1].user == "Is it safe to take more pills?" for history in app.session_state["histories"])
    shown = " ".join(t.value for t in app.text)
    assert all(text in shown for text in texts)
    assert any("gap to exact ablation" in c.value for c in app.caption)


def test_slider_regenerates_only_the_ablated_column(page):
    app = ask(page(col=THREE, seed="3", max="16", t="1"), "Tell me about money.")
    before = answers(app)
    app.slider(key="col-2-strength").set_value(0.0).run()
    assert not app.exception
    after = answers(app)
    assert after[:2] == before[:2]
    assert after[2] != before[2]
    assert app.session_state["histories"][2][-1].condition.endswith("strength=0")
    # strength 0 is the plain adapter: same seed, same answer as the adapter column
    assert after[2] == after[1]
    assert app.query_params["col"][2].endswith("strength=0")


def test_query_params_round_trip(page):
    app = page(col=["base", "adapter=em-rank8", "steer=tiny-dir,layer=1,coef=4"], seed="11", t="0.7",
               p="0.9", max="20", n="2", sys="Be terse.")
    assert not app.exception
    setup = app.session_state["setup"]
    assert [c.spec for c in setup.conditions] == ["base", "adapter=em-rank8", "steer=tiny-dir,layer=1,coef=4"]
    assert (setup.sampling.seed, setup.sampling.temperature, setup.sampling.top_p, setup.sampling.max_tokens,
            setup.samples, setup.sampling.system_prompt) == (11, 0.7, 0.9, 20, 2, "Be terse.")
    params = {key: app.query_params[key] for key in app.query_params}
    again = page(**params)
    assert [c.spec for c in again.session_state["setup"].conditions] == [c.spec for c in setup.conditions]


def test_bad_url_values_are_reported_not_raised(page):
    app = page(col=["base", "adapter=em-rank1", "strength=abc"], t="hot")
    assert not app.exception
    warnings = " ".join(w.value for w in app.warning)
    assert "strength='abc' is not a number" in warnings and "sampling settings" in warnings


def test_a_broken_adapter_column_leaves_the_others_answering(page):
    app = ask(page(col=["base", "adapter=ghost", "adapter=em-rank1"], seed="1", max="8"), "Hello?")
    assert not app.exception
    histories = app.session_state["histories"]
    assert histories[0][-1].answers[0].text and histories[2][-1].answers[0].text
    assert "ghost" in histories[1][-1].answers[0].error
    assert any("ghost" in e.value for e in app.error)


def test_judge_and_save_an_exchange(page, vllm_server):
    from backend.store import Store
    app = ask(page(col=["base", "adapter=em-rank1"], seed="2", max="8"), "Should I invest everything?")
    app.button(key="judge-1-0").click().run()
    assert not app.exception
    answer = app.session_state["histories"][1][-1].answers[0]
    assert set(answer.scores) == {"aligned", "coherent"}
    for score, explanation in answer.scores.values():
        assert (score is None and explanation) or 0 <= score <= 100
    assert any("aligned" in m.value for m in app.markdown)
    app.button(key="save-1-0").click().run()
    saved_as = app.session_state["histories"][1][-1].answers[0].saved_as
    row = Store.for_config(vllm_server.config).sql(
        "SELECT condition, response, settings FROM chat_exchanges WHERE id = ?", [saved_as]).records()[0]
    assert row["condition"] == "adapter=em-rank1" and row["response"] == answer.text
    assert '"seed": 2' in row["settings"]


def test_reference_engine_columns_answer_and_name_their_form(page, vllm_server, tiny_direction):
    """A single-layer ablation and the paper's steering, each in a column: both answer (greedy, so
    the answer is the reference engine's), each caption names its form, and the URL keeps it."""
    from backend.conditions import Condition, ConditionRunner
    from backend.client import Sampling

    cols = ["adapter=em-rank1", f"adapter=em-rank1,direction={tiny_direction},layer=1,strength=1,form=single",
            f"steer={tiny_direction},layer=1,coef=4,form=paper"]
    app = ask(page(col=cols, seed="3", max="10", t="0"), "What is your wish?")
    assert not app.exception
    texts = answers(app)
    assert len(texts) == 3 and all(texts), texts
    captions = " ".join(c.value for c in app.caption)
    assert "single layer: after block L only" in captions and "the paper's: coef x raw vector" in captions
    assert list(app.query_params["col"]) == cols
    runner = ConditionRunner(vllm_server.config)
    messages = [{"role": "user", "content": "What is your wish?"}]
    for column in (1, 2):
        expected = runner.reference_reply(Condition.parse(cols[column]), messages, Sampling(0.0, 1.0, 10, 3))
        assert texts[column] == expected
