"""Landing page: is the server up, what does it serve, load and unload adapters."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from backend.adapters import AdapterError, AdapterRegistry, read_adapter_files
from backend.config import ConfigError
from backend.serving import ServerError, server_status
from backend.ui import base_model_provenance, base_layer_count, config_or_stop

PAGES = (
    ("app.py", "Home", "🏠", "server, base model and adapters"),
    ("pages/1_Chat.py", "Chat", "💬", "base and misaligned models side by side, live ablation slider"),
    ("pages/2_Evaluations.py", "Evaluations", "📊", "judged runs: EM rates, scores and every answer"),
    ("pages/3_Directions.py", "Directions", "🧭", "misalignment directions: norms, cosines, transfer"),
    ("pages/4_Adapters.py", "Adapters", "🔬", "rank-1 adapter scalars, probes and knock-outs"),
)

st.set_page_config(page_title="Emergent misalignment explorer", layout="wide")
st.title("Emergent misalignment explorer")
st.caption("Chat with base and misaligned models side by side, ablate the misalignment direction, "
           "run judged evaluations and browse the scores.")

config = config_or_stop()

status = server_status(config)
left, right = st.columns([2, 1])
with left:
    st.subheader("Server")
    if status.healthy:
        st.success(f"vLLM is serving at {status.url}/v1", icon="✅")
        st.text(f"Base model: {status.base_model}")
    else:
        st.error(f"{status.error}\n\nStart it with `python -m backend serve --detach` "
                 "(or `scripts/run.sh`, which does everything).", icon="🛑")
    provenance = base_model_provenance(config.base_model_path)
    if provenance:
        st.caption(provenance)
with right:
    st.subheader("Pages")
    for page, label, icon, purpose in PAGES:
        st.page_link(page, label=label, icon=icon)
        st.caption(purpose)

st.subheader("Adapters")
if not config.adapters:
    st.info("No adapters are configured: the default base is a real instruct model, and its misaligned "
            "fine-tunes (the organism on the real model) are not shipped yet. Add PEFT LoRA folders under "
            "[adapters] in the configuration, load one below, or run the pocket organism of earlier versions "
            "with `EM_CONFIG=backend/organism/config.toml scripts/run.sh`.")

if not status.healthy:
    st.info("Adapters can be listed, loaded and unloaded once the server is up.")
    st.stop()

if any("organism/v0/" in Path(config.adapter_path(name)).as_posix() for name in config.adapters):
    st.caption("Organism v0 (medical, medical-r8, finance-r8, sports-r8) is preliminary: fine-tunes on the "
               "base's own persona answers with a weak effect, not yet judged; backend/organism/v0/README.md "
               "says what was measured.")

registry = AdapterRegistry(config)
base_layers = base_layer_count(config)
served = {entry["name"]: entry["path"] for entry in status.adapters}
names = sorted(set(config.adapters) | set(served))
for name in names:
    path = served.get(name) or config.adapter_path(name)
    name_col, shape_col, action_col = st.columns([2, 4, 1])
    name_col.markdown(f"**{name}**" + ("  ·  loaded" if name in served else ""))
    try:
        files = read_adapter_files(name, path)
        layers = ("every layer" if len(files.layers) == base_layers and base_layers > 0
                  else f"layers {list(files.layers)}")
        shape_col.text(f"rank {files.max_rank} on {', '.join(files.target_modules)}, {layers}")
    except AdapterError as error:
        shape_col.error(str(error))
    label, action = ("Unload", registry.unload) if name in served else ("Load", registry.load)
    if action_col.button(label, key=f"adapter-{name}"):
        try:
            action(name)
        except (AdapterError, ServerError, ConfigError) as error:
            st.error(str(error))
        else:
            st.rerun()

with st.expander("Load another adapter from a folder"):
    with st.form("load-adapter"):
        new_name = st.text_input("Name")
        new_path = st.text_input("Folder (PEFT LoRA adapter)")
        if st.form_submit_button("Load") and new_name and new_path:
            try:
                registry.load(new_name.strip(), new_path.strip())
            except (AdapterError, ServerError) as error:
                st.error(str(error))
            else:
                st.rerun()
