"""Config loading, overrides and two-phase validation with dotted key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dancecore.config.schema import ConfigError, apply_overrides, load_run, parse_yaml, validate
from tests.conftest import TINY_RUN, deep_update


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value.errors


def test_tiny_config_validates(tmp_path):
    run = validate({**TINY_RUN, "output_dir": str(tmp_path)})
    assert run.policy.name == "testing-tiny" and run.policy.config.latent_size == 8
    assert run.optimizer.config.group_size == 4


def test_all_errors_reported_together_with_dotted_paths(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path)})
    data["train"]["learning_rat"] = 1e-4  # typo (structure)
    data["rewards"] = [{"name": "brightness", "weight": "heavy"}, {"name": "no-such-reward"}]
    data["sampler"]["shfit"] = 3  # typo (component phase)
    data["optimizer"]["group_size"] = "many"
    errors = _errors(data)
    joined = "\n".join(errors)
    assert "train.learning_rat: unknown key" in joined
    assert "rewards[0].weight" in joined
    assert "rewards[1].name" in joined and "no-such-reward" in joined
    assert "sampler.shfit: unknown key" in joined
    assert "optimizer.group_size" in joined
    assert len(errors) >= 5


def test_unknown_policy_and_missing_prompt_file(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path), "policy": {"name": "flx"}})
    data["prompts"] = {"path": str(tmp_path / "missing.txt")}
    errors = _errors(data)
    assert any(e.startswith("policy.name:") and "flx" in e for e in errors)
    assert any(e.startswith("prompts.path:") and "missing.txt" in e for e in errors)


def test_sampler_policy_mismatch_is_reported(tmp_path):
    data = deep_update(TINY_RUN, {"output_dir": str(tmp_path), "sampler": {"name": "ddim-sde"}})
    data["sampler"] = {"name": "ddim-sde", "num_steps": 4}
    assert any("expects 'epsilon'" in e for e in _errors(data))


def test_yaml_scalars_behave_as_users_expect():
    data = parse_yaml("lr: 1e-5\nflag: no\nok: true\nn: 3\n")
    assert data == {"lr": 1e-5, "flag": "no", "ok": True, "n": 3}


def test_yaml_duplicate_keys_and_python_tags_rejected():
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        parse_yaml("a: 1\na: 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("a: !!python/object/apply:os.system ['echo hi']\n")


def test_overrides_dotted_and_indexed():
    data = {"train": {"iterations": 5}, "rewards": [{"name": "a", "weight": 1.0}]}
    apply_overrides(data, ["train.iterations=7", "rewards[0].weight=0.5", "policy.preset=tiny"])
    assert data == {"train": {"iterations": 7}, "rewards": [{"name": "a", "weight": 0.5}], "policy": {"preset": "tiny"}}
    with pytest.raises(ConfigError, match="no such place"):
        apply_overrides(data, ["rewards[3].weight=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(data, ["iterations"])
    apply_overrides(data, ["rewards.0.weight=0.25"])  # a number after a list is an index too
    assert data["rewards"][0]["weight"] == 0.25
    with pytest.raises(ConfigError, match=r"'rewards.x.weight': no such place .*rewards\[0\]"):
        apply_overrides(data, ["rewards.x.weight=1"])


def test_output_dir_may_not_escape(tmp_path):
    errors = _errors(deep_update(TINY_RUN, {"output_dir": "../elsewhere"}))
    assert any(e.startswith("output_dir:") for e in errors)


def test_load_run_from_file_with_overrides(tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(tmp_path / "out")}))
    run = load_run(path, ["train.iterations=9"])
    assert run.config.train.iterations == 9


def test_quickstart_and_all_bundled_configs_validate():
    root = Path(__file__).resolve().parent.parent / "configs"
    configs = sorted(root.rglob("*.yaml"))
    assert root / "quickstart.yaml" in configs
    failures = {}
    for path in configs:
        try:
            load_run(path)
        except ConfigError as exc:
            failures[path.name] = exc.errors
    assert not failures, failures
