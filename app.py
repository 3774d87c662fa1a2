"""The dashboard's entry point: the page list (st.navigation), so the sidebar starts at Home, not "app"."""
from __future__ import annotations

import streamlit as st

from backend.ui import PAGES

st.set_page_config(page_title="Emergent misalignment explorer", layout="wide")
st.navigation([st.Page(page.path, title=page.title, icon=page.icon, default=index == 0)
               for index, page in enumerate(PAGES)]).run()
