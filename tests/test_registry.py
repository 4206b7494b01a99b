"""Plugin discovery: lazy, blockable, with clear errors."""

from __future__ import annotations

import pytest

from dancecore import registry
from dancecore.builtins.algorithms import GRPO


def test_builtins_are_registered_through_entry_points():
    names = {(p.kind, p.name) for p in registry.installed()}
    assert {("sampler", "flow-sde"), ("sampler", "ddim-sde"), ("optimizer", "grpo"), ("reward", "brightness")} <= names
    assert ("policy", "flux") in names
    info = next(p for p in registry.installed("optimizer") if p.name == "grpo")
    assert info.package == "dancecore" and info.version


def test_load_returns_the_class():
    assert registry.load("optimizer", "grpo") is GRPO


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
