"""The little state the Streamlit pages share; the only backend module that imports Streamlit."""
from __future__ import annotations

import os

import streamlit as st

from backend.config import Config, load_config


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
