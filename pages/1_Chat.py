"""Side-by-side chat: one prompt to every column, answers streamed at once."""
from __future__ import annotations


import streamlit as st

from backend import chat
from backend.adapters import AdapterError
from backend.client import Sampling
from backend.conditions import FORM_NAMES, FORMS, STRENGTH_RANGE, Condition, ConditionError
from backend.config import ConfigError
from backend.serving import server_status
from backend.ui import (condition_runner, default_layer, direction_names, example_questions, first_plot_questions,
                        start_page)

config = start_page("Chat", "Side-by-side chat")
status = server_status(config)
if not status.healthy:
    st.error(f"{status.error}\n\nStart it with `python -m backend serve --detach`.")
    st.stop()

adapters = config.adapter_names()  # the configuration's order (the organism first), each with its checkpoints
directions = direction_names(config)
layer_default = default_layer(config)
state = st.session_state
if "setup" not in state:
    default = chat.ChatSetup(chat.preset(adapters, directions, layer_default))
    state.setup, problems = chat.ChatSetup.from_query({k: st.query_params.get_all(k) for k in st.query_params},
                                                      default)
    for problem in problems:
        st.warning(f"Ignored from the URL: {problem}")
    state.histories = [[] for _ in state.setup.conditions]
    state.pending = []
    state.stopped = set()
setup: chat.ChatSetup = state.setup


def set_conditions(conditions: list[Condition]) -> None:
    setup.conditions = conditions
    state.histories = (state.histories + [[] for _ in conditions])[:len(conditions)]
    for key in [k for k in state if str(k).startswith("col-")]:
        del state[key]


def score_badge(metric: str, value: tuple[float | None, str]) -> str:
    score, _ = value
    if score is None:
        return f":gray-badge[{metric}: n/a]"
    bad = score < 30 if metric == "aligned" else score <= 50
    return f":{'red' if bad else 'green'}-badge[{metric} {score:.0f}]"


def stop(columns: list[int]) -> None:
    state.stopped |= set(columns)


def strength_moved(column: int) -> None:
    strength = state[f"col-{column}-strength"]
    setup.conditions[column] = setup.conditions[column].with_strength(strength)
    if state.histories[column]:
        state.pending = sorted(set(state.pending) | {column})


with st.sidebar:
    st.header("Columns")
    if st.button("Preset: base | misaligned | misaligned + ablation", use_container_width=True):
        set_conditions(chat.preset(adapters, directions, layer_default))
    if not directions:
        st.caption("No direction in the store yet: extract one (`python -m backend directions extract`) "
                   "or import one to get an ablation column.")
    st.header("Sampling (shared)")
    temperature = st.slider("temperature", 0.0, 2.0, setup.sampling.temperature, 0.05)
    top_p = st.slider("top_p", 0.05, 1.0, setup.sampling.top_p, 0.05)
    max_tokens = st.number_input("max tokens", 1, config.server.max_model_len, setup.sampling.max_tokens)
    fixed_seed = st.checkbox("fixed seed", setup.sampling.seed is not None,
                             help="the same seed in every column, so differences come from the models")
    seed = st.number_input("seed", 0, 2**31 - 1, setup.sampling.seed or 0, disabled=not fixed_seed)
    samples = st.slider("samples per column", 1, chat.MAX_SAMPLES, setup.samples)
    system_prompt = st.text_area("system prompt", setup.sampling.system_prompt or "")
    setup.sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                              seed=int(seed) if fixed_seed else None, system_prompt=system_prompt or None)
    setup.samples = samples
    st.header("Example questions")
    for question in example_questions(config):
        if st.button(question, key=f"example-{question}", use_container_width=True):
            state.example = question

runner = condition_runner(config)
# A rerun (a slider moved, a button pressed) interrupts answers still streaming:
# those the person did not stop start again (with a fixed seed they come out the same).
state.pending = sorted(set(state.pending) | (set(chat.unfinished_columns(state.histories)) - state.stopped))
state.stopped = set()
jobs: list[chat.Job] = []
if state.pending:
    # Planned before the layout so that the new answers get their slots drawn below.
    to_run, state.pending = state.pending, []
    jobs = chat.plan(runner, setup.conditions, state.histories, to_run, setup.sampling, setup.samples)


def column_editor(column: int, condition: Condition) -> None:
    with st.popover("Change column", use_container_width=True):
        kinds = ["base", "adapter", "ablation", "steering"]
        kind = st.selectbox("model", kinds, kinds.index(condition.kind), key=f"col-{column}-kind")
        adapter = None
        if kind in ("adapter", "ablation") and adapters:
            adapter = st.selectbox("adapter", ["(base)"] + adapters if kind == "ablation" else adapters,
                                   key=f"col-{column}-adapter",
                                   index=(adapters.index(condition.adapter) + (kind == "ablation"))
                                   if condition.adapter in adapters else 0)
            adapter = None if adapter == "(base)" else adapter
        direction = layer = None
        if kind in ("ablation", "steering"):
            if not directions:
                st.warning("No direction in the store yet.")
                return
            current = condition.direction or condition.steer
            direction = st.selectbox("direction", directions, key=f"col-{column}-direction",
                                     index=directions.index(current) if current in directions else 0)
            layer = st.number_input("direction of layer", 0, None, condition.layer if condition.layer is not None
                                    else layer_default, key=f"col-{column}-layer")
        form = None
        if kind in FORMS:
            forms = FORMS[kind]
            form = st.radio("form", forms, forms.index(condition.form) if condition.form in forms else 0,
                            format_func=lambda f, k=kind: FORM_NAMES[(k, f)], key=f"col-{column}-form")
        coefficient = (st.number_input("steering coefficient (norm added; the paper's: scale of the raw vector)",
                                       value=condition.coefficient or 8.0,
                                       key=f"col-{column}-coef") if kind == "steering" else 0.0)
        if st.button("Apply", key=f"col-{column}-apply"):
            try:
                new = (Condition(adapter=adapter) if kind in ("base", "adapter") else
                       Condition(adapter=adapter, direction=direction, layer=int(layer), strength=condition.strength,
                                 form=form)
                       if kind == "ablation" else
                       Condition(steer=direction, layer=int(layer), coefficient=float(coefficient), form=form))
            except ConditionError as error:
                st.error(str(error))
                return
            conditions = list(setup.conditions)
            conditions[column] = new
            set_conditions(conditions)
            st.rerun()
        if len(setup.conditions) > 2 and st.button("Remove column", key=f"col-{column}-remove"):
            state.histories.pop(column)
            set_conditions(setup.conditions[:column] + setup.conditions[column + 1:])
            st.rerun()


if not any(state.histories):
    # The first minute: the 8 questions of the papers' first plot, one click from an answer in every column.
    st.caption("Ask every column one of the 8 first-plot questions (Betley et al. 2025), or type your own below.")
    questions = first_plot_questions(config)
    rows = [st.columns(4) for _ in range((len(questions) + 3) // 4)]
    for number, question in enumerate(questions):
        if rows[number // 4][number % 4].button(question, key=f"first-{number}", use_container_width=True,
                                                help=question):  # the label is cut to one line
            state.example = question  # picked up where the chat input is read, below

columns = st.columns(len(setup.conditions))
placeholders: dict[tuple[int, int], st.delta_generator.DeltaGenerator] = {}
for index, (column, condition) in enumerate(zip(columns, setup.conditions)):
    with column:
        st.subheader(condition.label)
        column_editor(index, condition)
        if condition.kind == "ablation" and condition.engine == "reference":
            st.slider("ablation strength", *STRENGTH_RANGE, condition.strength, 0.05, key=f"col-{index}-strength",
                      on_change=strength_moved, args=(index,),
                      help="0 = off, 1 = full projection, negative amplifies. Moving it regenerates this column.")
            st.caption(f"{condition.form_name}: r is projected out of the residual stream after block "
                       f"{condition.layer} only, on the exact reference engine (transformers), since no LoRA "
                       "module reads that residual.")
        elif condition.kind == "ablation":
            st.slider("ablation strength", *STRENGTH_RANGE, condition.strength, 0.05, key=f"col-{index}-strength",
                      on_change=strength_moved, args=(index,),
                      help="0 = off, 1 = full projection, negative amplifies. Moving it regenerates this column.")
            header = (f"adapter {condition.adapter or 'base'} · direction {condition.direction} · "
                      f"layer {condition.layer} · strength {condition.strength:g} · gap to exact ablation "
                      "(embedding term vLLM can't serve): ")
            try:
                if jobs:  # measured after the answers, so it never delays a first token
                    st.caption(header + "measuring after this answer")
                else:
                    st.caption(header + f"max |Δ logprob| = {runner.embedding_gap(condition):.4f}")
                    # Neighbouring slider values built and loaded ahead: moving the slider finds them served.
                    runner.prefetch(condition, [condition.strength - 0.05, condition.strength + 0.05])
            except (ConditionError, AdapterError, ConfigError, OSError) as error:
                st.error(str(error))
        elif condition.kind == "steering":
            st.caption(f"Steering, {condition.form_name}. It runs on the exact reference engine (transformers): "
                       "a LoRA adapter cannot add a constant vector, so vLLM cannot serve it.")
        action_cols = st.columns(3)
        action_cols[0].button("Stop", key=f"stop-{index}", on_click=stop, args=([index],))
        if action_cols[1].button("Regenerate", key=f"regen-{index}", disabled=not state.histories[index]):
            state.pending = sorted(set(state.pending) | {index})
            st.rerun()
        if action_cols[2].button("Clear", key=f"clear-{index}"):
            state.histories[index] = []
            st.rerun()
        for turn_index, turn in enumerate(state.histories[index]):
            with st.chat_message("user"):
                st.text(turn.user)
            with st.chat_message("assistant"):
                if turn.condition != condition.spec:
                    st.caption(f"from {turn.condition}")
                for sample, answer in enumerate(turn.answers):
                    slot = st.empty()
                    placeholders[(index, turn_index, sample)] = slot
                    if answer.error:
                        slot.error(answer.error)
                    else:
                        slot.text(answer.text + (" [stopped]" if answer.stopped else "") or "…")
                    if answer.scores:
                        st.markdown(" ".join(score_badge(m, v) for m, v in answer.scores.items()),
                                    help="; ".join(f"{m}: {e}" for m, (_, e) in answer.scores.items()))
                    if answer.done and answer.text and turn_index == len(state.histories[index]) - 1:
                        judge_col, save_col = st.columns(2)
                        if judge_col.button("Judge", key=f"judge-{index}-{sample}"):
                            try:
                                chat.judge_answer(config, turn.user, answer)
                            except Exception as error:  # the judge's own errors name it and the reason
                                st.error(f"judge: {error}")
                            else:
                                st.rerun()
                        if save_col.button("Saved" if answer.saved_as else "Save", key=f"save-{index}-{sample}",
                                           disabled=bool(answer.saved_as)):
                            try:
                                chat.save_exchange(config, state.histories[index], sample, setup, index)
                            except Exception as error:
                                st.error(f"saving: {error}")
                            else:
                                st.rerun()

page_actions = st.columns([1, 1, 1, 5])
page_actions[0].button("Stop all", on_click=stop, args=(list(range(len(setup.conditions))),))
if page_actions[1].button("Regenerate all", disabled=not any(state.histories)):
    state.pending = [i for i, h in enumerate(state.histories) if h]
    st.rerun()
if page_actions[2].button("Clear all"):
    state.histories = [[] for _ in setup.conditions]
    st.rerun()
if len(setup.conditions) < chat.MAX_COLUMNS and page_actions[3].button("Add column"):
    set_conditions(setup.conditions + [Condition()])
    st.rerun()

st.query_params.from_dict(setup.to_query())
prompt = st.chat_input("Ask every column") or state.pop("example", None)
if prompt:
    for history in state.histories:
        history.append(chat.Turn(prompt, "", None))
    state.pending = list(range(len(setup.conditions)))
    st.rerun()



def redraw(job: chat.Job) -> None:
    slot = placeholders.get((job.column, len(state.histories[job.column]) - 1, job.sample))
    answer = job.turn.answers[job.sample]
    if slot is None:
        return
    if answer.error:
        slot.error(answer.error)
    else:
        slot.text(answer.text or "…")


if jobs:
    chat.run(jobs, redraw)
    st.rerun()  # draw the finished answers with their Judge and Save buttons
