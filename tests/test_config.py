import warnings

import pytest
import yaml

from vjepa_fast.config import CONFIG_DIR, ConfigError, load_config


SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_with_no_unknown_key(name):
    """Every key is known; the one report allowed is of the official cluster keys, which change nothing here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(name)
    assert cfg.name == name
    messages = [str(w.message) for w in caught]
    assert all(m.startswith("config keys not used here: nodes=") for m in messages), messages
    assert bool(messages) == (cfg.nodes is not None)


def test_vitl16_has_the_paper_values():
    cfg = load_config(CONFIG_DIR / "vitl16.yaml")
    assert cfg.encoder_size == (1024, 24, 16, 4.0)
    assert cfg.data.batch_size * cfg.nodes * cfg.tasks_per_node == 3072
    assert cfg.total_steps == 90_000
    assert [m.num_blocks for m in cfg.mask] == [8, 2]
    assert [m.spatial_scale for m in cfg.mask] == [(0.15, 0.15), (0.7, 0.7)]
    assert cfg.optimization.final_lr == 1e-6 and cfg.optimization.ema == (0.998, 1.0)
    assert load_config("vith16_384").data.crop_size == 384


def _write(tmp_path, tree, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_unknown_keys_warn_with_their_names(tmp_path):
    tree = yaml.safe_load((CONFIG_DIR / "vitl16.yaml").read_text())
    tree["data"]["frobnicate"] = 3
    tree["model"]["extra_thing"] = True
    with pytest.warns(UserWarning, match=r"data\.frobnicate.*model\.extra_thing"):
        cfg = load_config(_write(tmp_path, tree))
    assert cfg.data.batch_size == 24


def test_overrides_parse_yaml_values_and_list_indices():
    cfg = load_config("demo", ["data.batch_size=4", "optimization.lr=1e-3", "mask.1.num_blocks=3",
                               "data_aug.random_resize_scale=[0.5, 1.0]"])
    assert cfg.data.batch_size == 4
    assert cfg.optimization.lr == pytest.approx(1e-3)  # '1e-3' is a string to PyYAML: still a number here
    assert cfg.mask[1].num_blocks == 3 and cfg.mask[0].num_blocks == 8
    assert cfg.data_aug.random_resize_scale == (0.5, 1.0)


@pytest.mark.parametrize("override, key", [
    ("data.crop_size=100", "data.crop_size=100"),
    ("data.num_frames=7", "data.num_frames=7"),
    ("mask.0.spatial_scale=[0.0, 0.2]", "mask[0].spatial_scale=[0.0, 0.2]"),
    ("mask.1.temporal_scale=[0.5, 1.5]", "mask[1].temporal_scale=[0.5, 1.5]"),
    ("data_aug.random_resize_scale=[0.3, 1.2]", "data_aug.random_resize_scale=[0.3, 1.2]"),
    ("model.model_name=vit_colossal", "model.model_name='vit_colossal'"),
    ("model.num_heads=5", "model.num_heads=5"),
    ("meta.dtype=float64", "meta.dtype='float64'"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=two", "data.batch_size: expected an integer, got 'two'"),
    ("optimization.lr=fast", "optimization.lr: expected a number, got 'fast'"),
    ("model.attn_backend=magic", "model.attn_backend='magic'"),
    ("mask.0.truncation=middle", "mask[0].truncation='middle'"),
])
def test_invalid_values_name_key_and_value(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert key in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("demo", ["data.batch_size"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config("demo", ["mask.5.num_blocks=1"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    from vjepa_fast.config import save_config

    cfg = load_config("demo", ["data.batch_size=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
