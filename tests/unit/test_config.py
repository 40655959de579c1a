from helpers.paths import ROOT
import pytest

from miles_ray.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "total_steps: 7\ntrain:\n  lr: 0.01\n"),
                      ["train.lr=2e-4", "rollout.n_samples_per_prompt=4", "cluster.colocate=true"])
    assert cfg.total_steps == 7
    assert cfg.train.lr == pytest.approx(2e-4)  # CLI beats YAML
    assert cfg.rollout.n_samples_per_prompt == 4 and cfg.cluster.colocate is True
    assert cfg.rollout.max_new_tokens == 16  # untouched default


def test_unknown_yaml_key_names_key_and_close_match(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  lerning_rate: 1\n  lr: 1\n"))
    assert "train.lerning_rate" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "rollout:\n  n_sample_per_prompt: 4\n"))
    assert "rollout.n_samples_per_prompt" in str(err.value)


def test_unknown_override_names_close_match():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lrr=1e-3"])
    assert "'train.lrr'" in str(err.value) and "Did you mean 'train.lr'" in str(err.value)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["total_steps"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=fast"])
    assert "train.lr" in str(err.value) and "fast" in str(err.value)
    with pytest.raises(ConfigError, match="rollout.n_samples_per_prompt"):
        load_config(None, ["rollout.n_samples_per_prompt=0"])


def test_section_given_scalar_and_unregistered_algorithm(tmp_path):
    with pytest.raises(ConfigError, match="'train'.*section"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match="algorithm.advantage='nope'.*grpo"):
        load_config(None, ["algorithm.advantage=nope"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_example_configs_load():
    from pathlib import Path

    for path in (ROOT / "examples").glob("*.yaml"):
        load_config(path)
