"""A key a config leaves out takes the default of the official trainer the file is for (config.OFFICIAL_DEFAULTS):
the table read back from the official files' text (where VJEPA_FAST_OFFICIAL_DIR names them), shipped V-JEPA 1 and
V-JEPA 2 files with each key left out, and `optimization.ipe: null` as one pass over the data."""
import ast
import copy
import csv
import os
import warnings
from pathlib import Path

import pytest
import yaml

from vjepa_fast.config import (APPS, CONFIG_DIR, NO_DEFAULT, NOT_USED_HERE, OFFICIAL_ALIASES, OFFICIAL_DEFAULTS,
                               ConfigError, MaskConfig, config_from_dict, official_app, resolve_ipe)
from vjepa_fast.data import steps_per_pass
from vjepa_fast.train import train
from helpers import tiny_config

ANCHORS = Path(os.environ.get("VJEPA_FAST_OFFICIAL_DIR", "/nonexistent"))
SOURCES = {"vjepa": ANCHORS / "jepa", "vjepa2": ANCHORS / "vjepa2"}
MASK_SOURCES = {"vjepa": "src/masks/multiblock3d.py", "vjepa2": "src/masks/multiseq_multiblock3d.py"}
official_source = pytest.mark.skipif(not all(p.is_dir() for p in SOURCES.values()),
                                     reason="VJEPA_FAST_OFFICIAL_DIR does not name the official jepa/ and vjepa2/")
# The trainers' names for the config sections (`args` is the whole file).
SECTIONS = {"args": "", "cfgs_meta": "meta", "cfgs_model": "model", "cfgs_data": "data", "cfgs_data_aug": "data_aug",
            "cfgs_opt": "optimization", "cfgs_loss": "loss", "cfgs_logging": "logging"}
# init_data's arguments for the data keys: a trainer that does not pass one leaves it at init_data's default.
LOADER_ARGUMENTS = {"filter_short_videos": "data.filter_short_videos", "filter_long_videos": "data.filter_long_videos",
                    "duration": "data.clip_duration"}
NOT_FIELDS = {"data.mask_type", "data.log_resource_utilization"}  # V-JEPA 1 keys with no field here (warned about)
BASE_FILES = {"vjepa": "vitl16", "vjepa2": "vjepa2_vitl16"}  # shipped official files of each trainer


def _plain(value):
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _evaluate(node, names: dict):
    return eval(compile(ast.Expression(node), "<official default>", "eval"), {"__builtins__": {"int": int}}, names)


def _constants(tree: ast.Module) -> dict:
    """Module-level NAME = literal assignments (the trainers' _GLOBAL_SEED)."""
    return {node.targets[0].id: node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)}


def _gets(tree: ast.Module, owners: dict, names: dict) -> dict:
    """{key: default} of every `owner.get("name", default)` in `tree` whose owner is in `owners` (key: section.name)."""
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in owners and len(node.args) == 2):
            section = owners[node.func.value.id]
            key = f"{section}.{node.args[0].value}" if section else node.args[0].value
            found[OFFICIAL_ALIASES.get(key, key)] = _evaluate(node.args[1], names)
    return found


def official_defaults(app: str) -> dict:
    """{our key: default} the official trainer `app` takes for a key its file leaves out: its `.get(key, default)`
    calls, and init_data's defaults for the loader arguments it does not pass."""
    root = SOURCES[app]
    trainer = ast.parse((root / "app/vjepa/train.py").read_text())
    defaults = _gets(trainer, SECTIONS, _constants(trainer))
    passed = {kw.arg for node in ast.walk(trainer) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "init_data" for kw in node.keywords}
    init_data, = [node for node in ast.walk(ast.parse((root / "src/datasets/data_manager.py").read_text()))
                  if isinstance(node, ast.FunctionDef) and node.name == "init_data"]
    arguments = init_data.args.args[-len(init_data.args.defaults):]
    for argument, default in zip(arguments, init_data.args.defaults):
        if argument.arg in LOADER_ARGUMENTS and argument.arg not in passed:
            defaults[LOADER_ARGUMENTS[argument.arg]] = _evaluate(default, {})
    return defaults


@official_source
@pytest.mark.parametrize("app", APPS)
def test_the_table_holds_each_official_trainers_defaults(app):
    official = official_defaults(app)
    assert official["meta.seed"] == 0 and official["optimization.ipe"] is None  # the parsing finds what it should
    ignored = {key for key in official if key in NOT_USED_HERE or key in NOT_FIELDS}
    column = APPS.index(app)
    table = {key: _plain(values[column]) for key, values in OFFICIAL_DEFAULTS.items() if values[column] != NO_DEFAULT}
    assert {key: _plain(value) for key, value in official.items() if key not in ignored} == table
    if app == "vjepa":
        assert ignored == NOT_FIELDS | {"data.pin_mem"}


@official_source
@pytest.mark.parametrize("app", APPS)
def test_mask_defaults_are_the_official_mask_collators(app):
    masks = ast.parse((SOURCES[app] / MASK_SOURCES[app]).read_text())
    official = _gets(masks, {"m": "mask"}, {})
    assert len(official) >= 2
    assert official == {key: getattr(MaskConfig, key.split(".")[1]) for key in official}


def _without(app: str, key: str) -> dict:
    """The shipped official file of `app` with `key` (by either of its names) left out."""
    tree = yaml.safe_load((CONFIG_DIR / f"{BASE_FILES[app]}.yaml").read_text())
    for name in [key, *(official for official, ours in OFFICIAL_ALIASES.items() if ours == key)]:
        *sections, last = name.split(".")
        node = tree
        for section in sections:
            node = node.get(section, {})
        node.pop(last, None)
    return tree


def _load(tree: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the launcher keys of the official files
        return config_from_dict(tree, name="defaults")


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


CASES = [(app, key) for key, values in OFFICIAL_DEFAULTS.items() for app, value in zip(APPS, values)
         if value != NO_DEFAULT]


@pytest.mark.parametrize("app,key", CASES, ids=[f"{app}-{key}" for app, key in CASES])
def test_a_file_leaving_a_key_out_gets_its_trainers_default(app, key):
    tree = _without(app, key)
    assert official_app(tree) == app
    expected = OFFICIAL_DEFAULTS[key][APPS.index(app)]
    if (app, key) == ("vjepa2", "model.use_mask_tokens"):  # V-JEPA 2's default predictor has no mask tokens
        with pytest.raises(ConfigError, match="model.use_mask_tokens=False: only the mask-token predictor"):
            _load(tree)
        return
    if (app, key) == ("vjepa2", "model.use_rope"):
        tree["model"]["model_name"] = "vit_large"  # not a vit_*_rope name, which would turn RoPE on
    if key == "data.datasets":  # the embedded dataset: one file, so one weight and one clip length at most
        tree["data"].pop("datasets_weights", None)
        tree["data"]["dataset_fpcs"] = tree["data"].get("dataset_fpcs", [16])[:1] if app == "vjepa2" else None
    assert _plain(_value(_load(tree), key)) == _plain(expected)


def test_the_issues_v2_defaults():
    keys = ["optimization.ipe_scale", "optimization.ipe", "data_aug.random_resize_aspect_ratio",
            "model.uniform_power", "meta.seed", "meta.use_sdpa", "optimization.clip_grad"]
    tree = _without("vjepa2", keys[0])
    for key in keys[1:]:
        section, name = key.split(".")
        tree[section].pop(name, None)
    with pytest.warns(UserWarning, match="meta.use_sdpa is absent: the official default"):
        config_from_dict(copy.deepcopy(tree), name="defaults")
    cfg = _load(tree)
    assert (cfg.optimization.ipe_scale, cfg.optimization.ipe, cfg.data_aug.random_resize_aspect_ratio,
            cfg.model.uniform_power, cfg.meta.seed, cfg.meta.use_sdpa, cfg.optimization.clip_grad) == \
        (1.0, None, (3 / 4, 4 / 3), False, 0, False, None)
    assert cfg.model.attn_backend == "eager"  # use_sdpa false: the plain attention math, as the official code
    tree["model"]["attn_backend"] = "sdpa"  # unless a backend is chosen
    assert _load(tree).model.attn_backend == "sdpa"
    v1 = _load(_without("vjepa", "model.uniform_power"))
    assert v1.model.uniform_power and v1.model.attn_backend == "sdpa" and v1.optimization.clip_grad == 10.0


def test_ipe_null_is_one_pass_over_the_data(tmp_path):
    dataset = tmp_path / "data.csv"
    dataset.write_text("".join(f"v{i}.mp4 0\n" for i in range(10)))
    cfg = _load(_without("vjepa2", "optimization.ipe") | {"name": "x"})
    cfg.data.batch_size = 2
    assert steps_per_pass(cfg, [str(dataset)], world_size=3) == 2  # ceil(10 / 3) = 4 clips per rank
    assert steps_per_pass(cfg, [str(dataset)]) == 5
    cfg.optimization.accumulation_steps = 2
    assert steps_per_pass(cfg, [str(dataset)]) == 2
    cfg.data.batch_size = 64
    assert steps_per_pass(cfg, [str(dataset)]) == 1
    with pytest.raises(ValueError, match="optimization.ipe is null"):
        cfg.total_steps
    resolved = resolve_ipe(cfg, 7)
    assert resolved.optimization.ipe == 7 and resolved.total_steps == 7 * cfg.optimization.epochs
    assert resolved.logging.keep_every == 50 * 7  # meta.save_every_freq: 50 epochs
    assert cfg.optimization.ipe is None  # a copy
    with pytest.raises(ConfigError, match="optimization.ipe=0: must be >= 1, or null"):
        tiny_config("optimization.ipe=0")


def test_training_with_ipe_null_runs_epochs_of_one_pass(tiny_dataset, tmp_path):
    files = [tiny_dataset.motion_train_csv]
    length = len(open(files[0]).read().splitlines())
    cfg = tiny_config(f"data.datasets={files}", "optimization.ipe=null", "optimization.epochs=1",
                      "data.batch_size=4", "logging.health_every=0")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.end_step == length // 4
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == length // 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimization"]["ipe"] == length // 4
