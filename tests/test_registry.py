"""Plugin discovery: lazy, blockable, with clear errors."""

from __future__ import annotations

import pytest

from dancecore import registry
from dancecore.builtins.algorithms import GRPO


def test_builtins_are_registered_through_entry_points():
    names = {(p.kind, p.name) for p in registry.installed()}
    assert {("sampler", "flow-sde"), ("sampler", "ddim-sde"), ("algorithm", "grpo"), ("reward", "brightness")} <= names
    assert ("policy", "flux") in names
    info = next(p for p in registry.installed("algorithm") if p.name == "grpo")
    assert info.package == "dancecore" and info.version


def test_load_returns_the_class():
    assert registry.load("algorithm", "grpo") is GRPO
    assert registry.load("optimizer", "grpo") is GRPO  # the old kind name still finds it


def test_unknown_plugin_names_what_is_installed():
    with pytest.raises(registry.PluginError, match="no reward plugin named 'nope'.*brightness"):
        registry.load("reward", "nope")


def test_blocked_plugin(monkeypatch):
    monkeypatch.setenv("DANCECORE_BLOCK_PLUGINS", "reward:brightness, jpeg-compressibility")
    with pytest.raises(registry.PluginError, match="blocked"):
        registry.load("reward", "brightness")
    with pytest.raises(registry.PluginError, match="blocked"):
        registry.load("reward", "jpeg-compressibility")
    assert registry.load("sampler", "flow-sde")


def test_contract_problems_are_named():
    class NoConfig:
        def score(self):
            pass

    assert any("Config" in p for p in registry.contract_problems("reward", NoConfig))

    class MissingMethod:
        from dancecore.contracts.component import ComponentConfig as Config

    assert any("`score`" in p for p in registry.contract_problems("reward", MissingMethod))


def test_an_algorithm_in_the_old_optimizers_group_is_still_found(monkeypatch):
    from importlib import metadata

    from dancecore.builtins.algorithms import GRPO

    old = metadata.EntryPoint("legacy-grpo", "dancecore.builtins.algorithms:GRPO", "dancecore.optimizers")
    real = metadata.entry_points

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return found + [old] if kwargs.get("group") == "dancecore.optimizers" else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    assert registry.load("algorithm", "legacy-grpo") is GRPO


def test_one_name_from_two_packages_is_an_error_naming_both(monkeypatch):
    from importlib import metadata

    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}
            self.version = "1"

    def ep(package):
        entry = metadata.EntryPoint("twin", "dancecore.builtins.rewards:Brightness", "dancecore.rewards")
        object.__setattr__(entry, "dist", Dist(package))
        return entry

    real = metadata.entry_points
    monkeypatch.setattr(
        metadata,
        "entry_points",
        lambda **kw: (
            [*real(**kw), ep("pkg-one"), ep("pkg-two")] if kw.get("group") == "dancecore.rewards" else real(**kw)
        ),
    )
    with pytest.raises(registry.PluginError, match=r"more than one package \(pkg-one, pkg-two\)"):
        registry.load("reward", "twin")
