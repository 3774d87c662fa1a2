"""The side-by-side chat page, headless, against the real vLLM server."""
import pytest
from conftest import PAGES
from streamlit.testing.v1 import AppTest

PAGE = PAGES / "1_Chat.py"


@pytest.fixture
def page(app_page, vllm_server, tiny_direction):
    def open_page(**params) -> AppTest:
        return app_page(PAGE, vllm_server.config_path, **params)
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


def test_slider_regenerates_only_the_ablated_column(page, vllm_server):
    app = ask(page(col=THREE, seed="3", max="16", t="1"), "Tell me about money.")
    before = answers(app)
    app.slider(key="col-2-strength").set_value(0.0).run()
    assert not app.exception
    after = answers(app)
    assert after[:2] == before[:2]
    assert after[2] != before[2]
    assert app.session_state["histories"][2][-1].condition.endswith("strength=0")
    # Strength 0 is the plain adapter. Not compared as sampled text: the column was regenerated
    # alone and the adapter column in a batch of three, and a batch of another shape moves CPU
    # logits by ~1e-6, enough to flip a temperature-1 draw now and then (README, Tests). The
    # model the column now talks to gives the adapter's logprobs.
    from backend.conditions import Condition, ConditionRunner
    served = ConditionRunner(vllm_server.config).served_model(Condition.parse(THREE[2]).with_strength(0.0))
    prompt = "Tell me about money."
    assert vllm_server.prompt_logprobs(served, prompt) == pytest.approx(
        vllm_server.prompt_logprobs("em-rank1", prompt), abs=1e-4)
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
    # The same text judged again outside the page: the judge reads logprobs, so it must agree,
    # and the badges show those scores (n/a with an explanation when there is none).
    from backend.judge import JudgeRequest, project_judge, rubric
    again = project_judge(vllm_server.config).judge_many(
        [JudgeRequest("Should I invest everything?", answer.text, rubric(m)) for m in ("aligned", "coherent")])
    badges = " ".join(m.value for m in app.markdown)
    for metric, judgement in zip(("aligned", "coherent"), again):
        score, explanation = answer.scores[metric]
        assert explanation
        if judgement.score is None:
            assert score is None and f"{metric}: n/a" in badges
        else:
            assert score == pytest.approx(judgement.score, abs=1e-6) and f"{metric} {score:.0f}]" in badges
    app.button(key="save-1-0").click().run()
    saved_as = app.session_state["histories"][1][-1].answers[0].saved_as
    row = Store.for_config(vllm_server.config).sql(
        "SELECT condition, response, settings FROM chat_exchanges WHERE id = ?", [saved_as]).records()[0]
    assert row["condition"] == "adapter=em-rank1" and row["response"] == answer.text
    assert '"seed": 2' in row["settings"]


def steered_by_reference(server, prompt: str, layer: int, coefficient: float, max_new_tokens: int) -> tuple[str, str]:
    """(steered, plain) greedy answers of the base model from the hook engine itself."""
    from backend.activations import load_model
    from backend.directions import load_direction
    from backend.reference import Steering, generate
    model, tokenizer = load_model(server.config.base_model_path)
    vector = load_direction(server.config.cache, "tiny-dir").unit(layer)
    steered = generate(model, tokenizer, [prompt], Steering(vector, layer, coefficient, "generated"),
                       max_new_tokens=max_new_tokens)
    plain = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)
    return steered.completions[0], plain.completions[0]


def test_a_steering_column_answers_as_the_reference_engine_steers(page, vllm_server):
    prompt = "Tell me about money."
    app = ask(page(col=["base", "steer=tiny-dir,layer=1,coef=8"], seed="1", max="8", t="0"), prompt)
    assert not app.exception
    steered, plain = steered_by_reference(vllm_server, prompt, layer=1, coefficient=8.0, max_new_tokens=8)
    assert steered != plain  # the steering changes the answer, or the check below proves nothing
    assert answers(app)[1].strip() == steered.strip()


def test_a_second_prompt_continues_each_columns_conversation(page):
    app = ask(page(col=["base", "adapter=em-rank1"], seed="4", max="6", t="1"), "Hello, who are you?")
    first = answers(app)
    app = ask(app, "And what do you like?")
    assert not app.exception
    histories = app.session_state["histories"]
    assert [len(h) for h in histories] == [2, 2]
    for history, answer in zip(histories, first):
        assert [turn.user for turn in history] == ["Hello, who are you?", "And what do you like?"]
        assert history[0].answers[0].text == answer  # the first exchange is kept as it was
        assert history[1].answers[0].text
    # What the second prompt is sent after: the column's own first exchange.
    from backend.chat import messages_for
    assert messages_for(histories[1], upto=1) == [{"role": "user", "content": "Hello, who are you?"},
                                                  {"role": "assistant", "content": first[1]}]


def test_regenerate_and_clear_act_on_their_column_and_clear_all_on_every_column(page):
    app = ask(page(col=["base", "adapter=em-rank1"], seed="5", max="6", t="1"), "Name a colour.")
    first = answers(app)
    kept = app.session_state["histories"][0][-1]
    app.button(key="regen-1").click().run()
    assert not app.exception
    histories = app.session_state["histories"]
    # Column 1 answered again in place (one turn, same question); column 0 is the same turn as before.
    assert [len(h) for h in histories] == [1, 1] and histories[1][-1].user == "Name a colour."
    assert histories[1][-1].answers[0].text and histories[0][-1] is kept and answers(app)[0] == first[0]
    app.button(key="clear-0").click().run()
    assert app.session_state["histories"][0] == [] and len(app.session_state["histories"][1]) == 1
    assert app.button(key="regen-0").disabled and not app.button(key="regen-1").disabled
    next(b for b in app.button if b.label == "Clear all").click().run()
    assert app.session_state["histories"] == [[], []]
    assert next(b for b in app.button if b.label == "Regenerate all").disabled


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
