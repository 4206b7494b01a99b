"""Bad input: 20+ broken configs fail with every error at once (dotted paths, no traceback, nothing
written); plugins are imported only when a config names them and can be blocked; the output
directory is proven writable before any model loads."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dancecore.cli import main
from tests.conftest import ROOT
from tests.fault.conftest import FIXTURE_SITE, TRIAL_RUN, write_config

GOOD = yaml.safe_dump({**TRIAL_RUN, "output_dir": "OUT"}, sort_keys=False)


def _edit(**changes) -> str:
    data = yaml.safe_load(GOOD)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


_DELETE = object()

#: name -> (YAML text, the dotted paths / phrases the errors must name)
BAD_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "top-level typo": (GOOD.replace("train:", "trian:"), ["trian: unknown key", "train: Field required"]),
    "nested typo": (_edit(train__learnin_rate=0.1), ["train.learnin_rate: unknown key"]),
    "wrong type": (_edit(train__iterations="ten"), ["train.iterations:"]),
    "negative count": (_edit(train__iterations=-1), ["train.iterations:"]),
    "unknown policy plugin": (_edit(policy__name="fluxx"), ["policy.name: no policy plugin named 'fluxx'"]),
    "unknown reward plugin": (_edit(rewards__0__name="hpsv9"), ["rewards[0].name: no reward plugin named 'hpsv9'"]),
    "component option typo": (_edit(sampler__num_stepz=4), ["sampler.num_stepz: unknown key"]),
    "component wrong type": (_edit(sampler__num_steps="many"), ["sampler.num_steps:"]),
    "reward weight not a number": (_edit(rewards__0__weight="heavy"), ["rewards[0].weight:"]),
    "no rewards": (_edit(rewards=[]), ["rewards:"]),
    "both prompt sources": (_edit(prompts={"texts": ["a"], "path": "p.txt"}), ["prompts:"]),
    "missing prompt file": (_edit(prompts={"path": "no/such/prompts.txt"}), ["prompts.path: prompt file not found"]),
    "bad enum": (_edit(train__mixed_precision="fp8"), ["train.mixed_precision:"]),
    "bad reward policy": (_edit(reward_failure={"policy": "ignore"}), ["reward_failure.policy:"]),
    "negative retries": (_edit(reward_failure={"retries": -1}), ["reward_failure.retries:"]),
    "infinite learning rate": (_edit(train__learning_rate=float("inf")), ["train.learning_rate:"]),
    "NaN reward weight": (_edit(rewards__0__weight=float("nan")), ["rewards[0].weight:"]),
    "'no' is a string, not False": (GOOD.replace("seed: 3", "seed: no"), ["seed:"]),
    "duplicate key": (GOOD.replace("seed: 3", "seed: 3\nseed: 4"), ["duplicate key 'seed'"]),
    "python object tag": (
        GOOD.replace("seed: 3", "seed: !!python/object/apply:os.system ['touch PWNED']"),
        ["invalid YAML", "python/object/apply:os.system"],
    ),
    "python name tag": (GOOD.replace("seed: 3", "seed: !!python/name:os.system"), ["invalid YAML"]),
    "'..' in output_dir": (
        GOOD.replace("output_dir: OUT", "output_dir: OUT/../../escape"),
        ["output_dir: Value error, must not contain '..'"],
    ),
    "top level not a mapping": ("- 1\n- 2\n", ["the top level of a config must be a mapping"]),
    "YAML syntax error": (GOOD.replace("seed: 3", "seed: [3"), ["invalid YAML (line"]),
    "empty file": ("", ["the top level of a config must be a mapping"]),
    "prediction type mismatch": (_edit(sampler={"name": "ddim-sde"}), ["sampler.name: sampler 'ddim-sde' expects"]),
    "duplicate reward names": (
        _edit(rewards=[{"name": "brightness"}, {"name": "brightness"}]),
        ["rewards named more than once"],
    ),
    "several errors at once": (
        _edit(train__iterations="x", sampler__eta="hot", rewards__0__name="nope", logging__colour=True),
        ["train.iterations:", "sampler.eta:", "rewards[0].name: no reward plugin", "logging.colour: unknown key"],
    ),
}


def _snapshot(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_bad_configs(tmp_path, monkeypatch, capsys, fault_report):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = work / "out"
    failures = []
    for index, (name, (text, expected)) in enumerate(BAD_CONFIGS.items()):
        config = work / f"bad-{index:02d}.yaml"
        config.write_text(text.replace("OUT", str(out)))
        before = _snapshot(tmp_path)
        code = main(["train", str(config)])
        captured = capsys.readouterr()
        err = captured.err
        problems = []
        if code == 0:
            problems.append("exit 0")
        if "Traceback" in err + captured.out:
            problems.append("traceback")
        missing = [e for e in expected if e not in err]
        if missing:
            problems.append(f"missing {missing} in {err!r}")
        if _snapshot(tmp_path) != before or (work / "PWNED").exists():
            problems.append(f"wrote {_snapshot(tmp_path) - before}")
        if problems:
            failures.append(f"{name}: {problems}")
    # an override error is reported like a config error
    config = write_config(work / "good.yaml", out)
    code = main(["train", str(config), "train.iterations", "train.iterations=abc"])
    err = capsys.readouterr().err
    if code == 0 or "is not of the form key.sub=value" not in err:
        failures.append(f"override: {err!r}")
    total = len(BAD_CONFIGS) + 1
    fault_report.row(
        f"{total} bad configs",
        f"{total - len(failures)}/{total}: exit 2, all errors with dotted paths, no traceback, nothing written",
        not failures,
    )
    assert not failures, "\n".join(failures)


def test_bad_config_in_a_real_process_shows_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIGS["several errors at once"][0].replace("OUT", str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "train", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "4 problem(s)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# ------------------------------------------------------------------------------ plugin loading


def test_plugins_are_imported_only_when_named(forkserver, tmp_path, fault_report):
    marker = tmp_path / "imported.txt"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(FIXTURE_SITE)]),
        "DANCECORE_TEST_MARKER": str(marker),
    }
    results = {}
    listing = subprocess.run(
        [sys.executable, "-m", "dancecore.cli", "plugins"], env=env, capture_output=True, text=True, timeout=300
    )
    results["listed by `dancecore plugins`"] = listing.returncode == 0 and "marker-reward" in listing.stdout
    results["`plugins` imported nothing"] = not marker.exists()
    fork_env = {"DANCECORE_TEST_MARKER": str(marker)}
    run = forkserver.run(
        "train", str(write_config(tmp_path / "run.yaml", tmp_path / "out", train={"iterations": 1})), env=fork_env
    )
    results["a run not naming it"] = run.status == 0 and not marker.exists()
    named = write_config(tmp_path / "named.yaml", tmp_path / "out2", rewards=[{"name": "marker-reward"}])
    blocked = forkserver.run("validate", str(named), env={**fork_env, "DANCECORE_BLOCK_PLUGINS": "marker-reward"})
    results["blocked by DANCECORE_BLOCK_PLUGINS"] = (
        blocked.status == 2 and "blocked by DANCECORE_BLOCK_PLUGINS" in blocked.output() and not marker.exists()
    )
    blocked_kind = forkserver.run(
        "validate", str(named), env={**fork_env, "DANCECORE_BLOCK_PLUGINS": "reward:marker-reward"}
    )
    results["blocked as kind:name"] = blocked_kind.status == 2 and not marker.exists()
    validate = forkserver.run("validate", str(named), env=fork_env)
    results["imported when named (control)"] = validate.status == 0 and marker.exists()
    ok = all(results.values())
    fault_report.row(
        "plugin whose import writes a marker",
        "no marker after `plugins` / other runs; blockable" if ok else str(results),
        ok,
    )
    assert ok, results


# ---------------------------------------------------------------------------- writable output


def test_output_dir_is_checked_before_any_model_loads(tiny_run, tmp_path, monkeypatch, forkserver, fault_report):
    from dancecore.training.trainer import OutputDirError, Trainer

    class MustNotLoad:
        Config = None

        def __init__(self, *args, **kwargs):
            raise AssertionError("a model was loaded before the output directory was checked")

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = tiny_run("a-file/out")
    run = dataclasses.replace(run, policy=dataclasses.replace(run.policy, cls=MustNotLoad))
    with pytest.raises(OutputDirError, match="is not writable"):
        Trainer(run)
    # an injected error (read-only file system) on the probe write
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    run = dataclasses.replace(tiny_run("ro"), policy=run.policy)
    with pytest.raises(OutputDirError, match="Read-only file system"):
        Trainer(run)
    monkeypatch.undo()
    child = forkserver.run("train", str(write_config(tmp_path / "run.yaml", blocker / "out")))
    text = child.output()
    ok = child.status == 2 and "is not writable" in text and "Loading" not in text and "Traceback" not in text
    fault_report.row("unwritable output_dir", f"exit {child.status} before any model loads (file in path, EROFS)", ok)
    assert ok, text


def test_yaml_loader_reads_scalars_as_yaml_1_2(fault_report):
    from dancecore.config.schema import ConfigError, parse_yaml

    cases = {
        "1e-5": 1e-5,
        "1.0e-3": 1e-3,
        "-2E+2": -200.0,
        ".5": 0.5,
        "3": 3,
        "no": "no",
        "off": "off",
        "yes": "yes",
        "on": "on",
        "true": True,
        "False": False,
        "~": None,
    }
    wrong = {text: parse_yaml(f"v: {text}")["v"] for text in cases if parse_yaml(f"v: {text}")["v"] != cases[text]}
    refused = 0
    for text in ("a: 1\na: 2\n", "a: !!python/object/apply:os.system ['true']\n", "a: !!python/name:os.system\n"):
        with pytest.raises(ConfigError):
            parse_yaml(text)
        refused += 1
    fault_report.row(
        "YAML loader (1.2 scalars, safe, no duplicates)",
        f"{len(cases) - len(wrong)}/{len(cases)} scalars as YAML 1.2; {refused}/3 unsafe/duplicate refused",
        not wrong and refused == 3,
    )
    assert not wrong, wrong
