"""The little state the Streamlit pages share; the only backend module that imports Streamlit."""
from __future__ import annotations

import os
from typing import NamedTuple

import streamlit as st

from backend.config import Config, load_config


class PageEntry(NamedTuple):
    path: str  # relative to the repository root, as st.page_link names it
    title: str
    icon: str  # a Material Symbol: Streamlit ships that font, a browser without emoji fonts still draws it
    purpose: str  # the one line Home shows under the link


PAGES = (
    PageEntry("app.py", "Home", ":material/home:", "server status, base model and adapters; shipped data"),
    PageEntry("pages/1_Chat.py", "Chat", ":material/chat:",
              "base, organism and organism with its direction ablated, side by side; the 8 first-plot questions"),
    PageEntry("pages/2_Evaluations.py", "Evaluations", ":material/bar_chart:",
              "judged runs: EM rates, scores and every answer"),
    PageEntry("pages/3_Directions.py", "Directions", ":material/explore:",
              "misalignment directions: norms, cosines, transfer"),
    PageEntry("pages/4_Adapters.py", "Adapters", ":material/biotech:", "rank-1 adapter scalars, probes and knock-outs"),
)


def start_page(tab: str, heading: str | None = None, caption: str | None = None) -> Config:
    """Every page's top, in the order Streamlit needs: the browser tab's title ("<tab> · EM
    explorer", wide layout), the sidebar, the heading (default: `tab`) and its caption; then the
    configuration, or a clear message in place of the page (config_or_stop)."""
    st.set_page_config(page_title=f"{tab} · EM explorer", layout="wide")
    sidebar_navigation()
    st.title(heading or tab)
    if caption:
        st.caption(caption)
    return config_or_stop()


def sidebar_navigation() -> None:
    """Every page's sidebar: the pages in PAGES order, Home first (Streamlit's own list is off in
    .streamlit/config.toml because it names the landing page after its file, "app")."""
    from streamlit.errors import StreamlitAPIException
    with st.sidebar:
        try:
            for entry in PAGES:
                st.page_link(entry.path, label=entry.title, icon=entry.icon)
        except StreamlitAPIException:  # a page run on its own (AppTest of one file) knows no other page
            pass


@st.cache_resource(show_spinner=False)
def _load(path: str | None, _mtime: float) -> Config:
    return load_config(path)


def current_config() -> Config:
    """The configuration named by EM_CONFIG (default config.toml), reloaded when the file changes."""
    from backend.config import DEFAULT_CONFIG
    path = os.environ.get("EM_CONFIG") or str(DEFAULT_CONFIG)
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        mtime = 0.0
    return _load(path, mtime)


@st.cache_resource(show_spinner=False)
def condition_runner(config: Config):
    """One per server process: it keeps the ablation compiler's prepared tensors warm."""
    from backend.conditions import ConditionRunner
    return ConditionRunner(config)


def base_model_provenance(base_model_path: str) -> str:
    """One line on where a fetched base model came from (its manifest), or '' for other folders."""
    import json
    from pathlib import Path
    manifest = Path(base_model_path) / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
        source = data["source"]
        return (f"{source['description']}; from the registry package {source['package']}=={source['version']} "
                f"({source['license']}), converted to {data['dtype']} on {data['created'][:10]}")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def direction_names(config: Config) -> list[str]:
    from backend.directions import list_directions
    return list_directions(config.cache)


def base_layer_count(config: Config) -> int:
    """Decoder layers of the base model; 0 when its config cannot be read."""
    from backend.architecture import BaseShape
    try:
        return BaseShape.from_model(config.base_model_path).num_layers
    except (OSError, ValueError, KeyError):
        return 0


def default_layer(config: Config) -> int:
    """The middle layer: where the paper's single-layer direction sits, relative to depth."""
    return base_layer_count(config) // 2


@st.cache_data(show_spinner=False)
def example_questions(_config: Config, question_set: str = "em_core") -> list[str]:
    from backend.questions import load_questions
    return [question.paraphrases[0] for question in load_questions(question_set)]


@st.cache_data(show_spinner=False)
def first_plot_questions(_config: Config, question_set: str = "em_core") -> list[str]:
    """The papers' 8 general questions (domain 'general' in the set), first paraphrase each."""
    from backend.questions import load_questions
    return [q.paraphrases[0] for q in load_questions(question_set) if getattr(q, "domain", None) == "general"]


def current_store(config: Config):
    """The store the pages read: EM_STORE if set (e.g. a synthetic store), else em.duckdb in the cache."""
    from backend.store import Store
    path = os.environ.get("EM_STORE")
    return Store(path) if path else Store.for_config(config)


def fetch_base_model(config: Config, progress) -> None:
    """Fetch the configured base model when it is a registry model's folder under cache/models."""
    from pathlib import Path

    from backend import models
    folder = Path(config.base_model_path)
    known = {models.folder_name(row["name"], row["dtype"]): row for row in models.list_models(folder.parent)}
    if folder.name not in known:
        raise models.ModelFetchError(f"{folder} is not a registry model's folder; fetch or copy it yourself")
    row = known[folder.name]
    models.fetch_model(row["name"], folder.parent, row["dtype"], progress=progress)


def config_or_stop() -> Config:
    """The configuration, or a clear message in place of the page."""
    from backend.config import ConfigError
    try:
        return current_config()
    except ConfigError as error:
        st.error(f"Configuration problem: {error}")
        st.stop()
