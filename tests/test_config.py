from pathlib import Path

import pytest

from backend.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path, tiny_models):
    (tmp_path / "models").symlink_to(tiny_models["base"].parent)
    config = load_config(write(tmp_path, 'base_model = "models/tiny-qwen2"\n[adapters]\nem = "models/em-rank1"\n'))
    assert config.base_model_path == str((tmp_path / "models/tiny-qwen2").resolve())
    assert config.adapter_path("em") == str((tmp_path / "models/em-rank1").resolve())
    assert config.cache == (tmp_path / "cache").resolve()


def test_hub_ids_are_kept_as_ids(tmp_path):
    config = load_config(write(tmp_path, 'base_model = "Qwen/Qwen2.5-14B-Instruct"\n'))
    assert config.base_model_path == "Qwen/Qwen2.5-14B-Instruct"


@pytest.mark.parametrize("text, named", [
    ('base_model = "Qwen/Qwen2.5-0.5B"\nbogus = 1\n', "unknown key 'bogus'"),
    ('[server]\nport = 8000\n', "missing key 'base_model'"),
    ('base_model = "Qwen/Qwen2.5-0.5B"\n[server]\nport = "x"\n', "key 'server.port'"),
    ('base_model = "Qwen/Qwen2.5-0.5B"\n[server]\nmax_loras = 0\n', "key 'server.max_loras'"),
    ('base_model = "./missing-model"\n', "key 'base_model': no model folder"),
    ('base_model = "Qwen/Qwen2.5-0.5B"\n[adapters]\nmed = "./nowhere"\n', "key 'adapters.med': no adapter folder"),
    ('base_model = [\n', "not valid TOML"),
])
def test_bad_configs_name_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        load_config(write(tmp_path, text))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_adapter_lists_the_configured_ones(tmp_path):
    config = load_config(write(tmp_path, 'base_model = "Qwen/Qwen2.5-0.5B"\n'))
    with pytest.raises(ConfigError, match="not in the configuration"):
        config.adapter_path("medical")
