"""Config loading: presets, overrides, and errors that name the key."""
import glob
import os

import pytest

from longtrain.config import ConfigError, layer_mixers, load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_every_preset_loads():
    for path in glob.glob(os.path.join(CONFIGS, "*.yaml")):
        load_config(path)


def test_overrides_apply():
    overrides = ["model.n_layers=8", "train.steps=3", "parallel.linear_sp=lasp1"]
    cfg = load_config(os.path.join(CONFIGS, "tiny.yaml"), overrides)
    assert cfg.model.n_layers == 8 and cfg.train.steps == 3 and cfg.parallel.linear_sp == "lasp1"
    assert layer_mixers(cfg.model) == ["gla", "gla", "gla", "softmax"] * 2


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer'.*did you mean model.n_layers"):
        load_config(None, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean train\?\)"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="unknown mixer 'glaa'"):
        load_config(None, ["model.pattern=glaa*3,softmax"])
    with pytest.raises(ConfigError, match="parallel.softmax_sp='rung'"):
        load_config(None, ["parallel.softmax_sp=rung"])
    with pytest.raises(ConfigError, match="data.source='bin' needs data.path"):
        load_config(None, ["data.source=bin"])
    load_config(None, ["parallel.sp_size=8", "parallel.softmax_sp=usp", "parallel.ulysses_size=2",
                       "model.n_heads=4"])  # heads split over U=2 inside usp, not over all 8 ranks
    with pytest.raises(ConfigError, match="parallel.ulysses_size=3 must divide parallel.sp_size=4"):
        load_config(None, ["parallel.sp_size=4", "parallel.softmax_sp=usp", "parallel.ulysses_size=3"])
    with pytest.raises(ConfigError, match="train.compile=true does not work with DeepSpeed ZeRO-3"):
        load_config(None, ["train.compile=true", "train.engine=deepspeed", "train.zero_stage=3"])
    load_config(None, ["train.compile=true", "train.engine=deepspeed", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.profile_step must be in 0..train.steps=5 .0: no trace., got 6"):
        load_config(None, ["train.steps=5", "train.profile_step=6"])
    for linear_sp in ("lasp1", "lasp2", "zeco", "ulysses"):  # every linear algorithm takes the zigzag layout
        load_config(None, ["parallel.sp_size=2", "parallel.layout=zigzag", f"parallel.linear_sp={linear_sp}"])
    with pytest.raises(ConfigError, match="model.layers has 2 entries"):
        load_config(None, ["model.layers=[gla,softmax]", "model.n_layers=4"])
