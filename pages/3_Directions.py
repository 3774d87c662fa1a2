"""Directions: where they came from, their norms, how they align, how they transfer, and a way to chat."""
from __future__ import annotations

import streamlit as st
from streamlit.errors import StreamlitAPIException

from backend import browse, shipped
from backend.conditions import STRENGTH_RANGE
from backend.store import Store, StoreError
from backend.ui import current_store, start_page

config = start_page("Directions")
store = current_store(config)


@st.cache_data(show_spinner=False, max_entries=8)
def cached_directions(path: str, version: tuple, cache_dir: str) -> list[browse.DirectionInfo]:
    return browse.directions(Store(path), cache_dir)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_transfer(path: str, version: tuple, definition: str, strength: float, runs: tuple[str, ...]):
    return browse.transfer_matrix(Store(path), definition, strength=strength, runs=runs)


try:
    version = browse.data_version(store)
    infos = cached_directions(str(store.path), version, str(config.cache))
except StoreError as error:
    st.error(str(error))
    st.stop()

if not infos:
    st.info(f"No directions in {store.path} or {config.cache / 'directions'} yet: extract one with "
            "`python -m backend directions extract` or import one with `python -m backend directions import`.")
    st.stop()

st.subheader("Directions and their source")
try:
    shipped_names = set(shipped.shipped_status(store).directions)
except (shipped.ShippedError, StoreError):
    shipped_names = set()
if shipped_names:
    st.caption(f":material/inventory_2: {', '.join(sorted(shipped_names))}: shipped data, imported on the first "
               "run (Home removes it).")
st.dataframe([{"name": i.name, "shipped": i.name in shipped_names, "adapter": i.adapter or browse.BASE,
               "base model": i.base_model,
               "source run": i.source_run, "counts": ", ".join(f"{k}={v}" for k, v in i.counts.items()),
               "layers": len(i.norms) if i.norms else None, "method": i.method, "apply as": i.use_as,
               "registered in store": i.in_store,
               "file": i.path, "problem": i.problem} for i in infos], hide_index=True, width="stretch")

st.caption(
    "Layer convention: our layer L is the residual stream after decoder block L (HF hidden_states[L + 1]; "
    "no embedding row). The paper's direction files (`python -m backend paper directions "
    "model-m_data-m_hs_X.pt model-m_data-a_hs_X.pt`) use the same numbering: their layer_i is our layer i, "
    "except that HF hands out their last layer after the final norm, where ours is the raw residual. "
    "A paper steering_vector.pt (`python -m backend paper steering`) is added at layers[L].mlp.down_proj, "
    "which is our residual after block L: use it as steer=NAME,layer=L,coef=alpha,form=paper. "
    "A random control with exactly the norm of a direction at every layer: `python -m backend directions "
    "random --like NAME --name NAME-random` (the authors' randn_like(v) * |v| is about sqrt(d) times longer).")

norms = browse.norms_frame(infos)
if not norms.empty:
    st.altair_chart(browse.chart_norms(norms), width="stretch")

n_layers = max((len(i.norms) for i in infos if i.norms), default=1)
layer = st.slider("layer for the cosine matrix", 0, max(n_layers - 1, 1), min(n_layers // 2, n_layers - 1),
                  key="dir_layer", disabled=n_layers <= 1)
cosines, skipped = browse.cosine_matrix(infos, layer)
for reason in skipped:
    st.warning(f"Left out of the cosine matrix: {reason}")
if not cosines.empty:
    st.altair_chart(browse.chart_cosine(cosines, layer))

st.subheader("Transfer matrix")
left, right = st.columns(2)
definition = left.radio("EM definition", list(browse.DEFINITIONS), horizontal=True, key="dir_definition",
                        format_func=lambda k: {"turner2025": "Turner et al. 2025",
                                               "betley2025": "Betley et al. 2025"}[k])
options = browse.filter_options(store)
strengths = options.strengths or [1.0]
strength = right.select_slider("ablation strength", strengths, value=1.0 if 1.0 in strengths else strengths[-1],
                               key="dir_strength")
runs = st.multiselect("runs (none = all)", [r["id"] for r in options.runs], key="dir_runs")
transfer = cached_transfer(str(store.path), version, definition, float(strength), tuple(runs))
if not transfer.empty:
    # A direction file not registered in the store (saved to the cache only) still knows its adapter.
    transfer = transfer.assign(direction_source=transfer["direction_source"].fillna(
        transfer["direction"].map({i.name: i.adapter for i in infos})))
if transfer.empty:
    st.caption("No evaluation run ablated a direction at this strength yet.")
else:
    st.altair_chart(browse.chart_transfer(transfer, browse.definition(definition), float(strength)))
    st.dataframe(transfer, hide_index=True, width="stretch")

st.subheader("Chat with a direction ablated")
names = [i.name for i in infos]
c1, c2, c3, c4 = st.columns(4)
adapters = sorted(set(config.adapters) | {a for a in options.adapters if a != browse.BASE}
                  | {i.adapter for i in infos if i.adapter})
adapter_choices = [browse.BASE] + adapters


def follow_direction() -> None:
    """A newly picked direction brings its own adapter: the natural 'adapter minus its direction' column."""
    picked = next(i for i in infos if i.name == st.session_state.dir_chat_direction)
    st.session_state.dir_chat_adapter = picked.adapter if picked.adapter in adapter_choices else browse.BASE


direction = c1.selectbox("direction", names, key="dir_chat_direction", on_change=follow_direction)
source = next(i for i in infos if i.name == direction)
adapter = c2.selectbox("adapter", adapter_choices, key="dir_chat_adapter",
                       index=adapter_choices.index(source.adapter) if source.adapter in adapter_choices else 0)
chat_layer = c3.number_input("layer", 0, max(n_layers - 1, 0), layer, key="dir_chat_layer")
chat_strength = c4.number_input("strength", *STRENGTH_RANGE, 1.0, 0.05, key="dir_chat_strength",
                                help="1 = remove the direction, 0 = off, negative amplifies")
query = browse.chat_query(None if adapter == browse.BASE else adapter, direction, int(chat_layer),
                          float(chat_strength))
link = browse.chat_link(None if adapter == browse.BASE else adapter, direction, int(chat_layer),
                       float(chat_strength))
try:
    st.page_link("pages/1_Chat.py", label=f"Open the chat: {' | '.join(query['col'])}", icon="💬",
                 query_params=query)
except StreamlitAPIException:  # this page run on its own (not through app.py): the plain link still works
    st.link_button(f"Open the chat: {' | '.join(query['col'])}", link)
st.code(link, language=None)
