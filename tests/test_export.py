"""`dancecore export`: refusals before any model loads, the model card, dtypes, atomic replacement.
The pipelines themselves are checked against `dancecore eval` in each policy plugin's tests
(`dancecore.testing.check_diffusers_export`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dancecore.cli import _main
from tests.conftest import TINY_RUN, deep_update

FLUX_RUN = deep_update(
    TINY_RUN,
    {
        "policy": {"name": "flux", "preset": "tiny"},
        "sampler": {"num_steps": 2},
        "optimizer": {"group_size": 2},
        "train": {"iterations": 1, "prompts_per_iteration": 1, "micro_batch_size": 2},
        "rewards": [{"name": "brightness", "weight": 1.0}, {"name": "jpeg-compressibility", "weight": 0.5}],
    },
)


def _config(directory: Path, data: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(directory / "out")}))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A tiny FLUX run trained for one iteration, with a held-out evaluation history."""
    pytest.importorskip("dancecore_flux")
    torch.set_num_threads(1)
    config = _config(tmp_path_factory.mktemp("flux"), FLUX_RUN)
    assert _main(["train", config]) == 0
    out = Path(yaml.safe_load(Path(config).read_text())["output_dir"])
    history = [{"iteration": 0, "eval/brightness": 0.5}, {"iteration": 1, "eval/brightness": 0.625}]
    (out / "eval").mkdir()
    (out / "eval" / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return config


def test_a_policy_without_the_export_contract_is_refused_before_loading(tmp_path, capsys):
    config = _config(tmp_path, TINY_RUN)
    assert _main(["export", config, "--checkpoint", "base", "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "policy 'testing-tiny' cannot be exported" in err and "diffusers_export" in err
    assert not (tmp_path / "x").exists()


def test_impossible_flags_are_config_errors(tmp_path, capsys):
    pytest.importorskip("dancecore_flux")
    config = _config(tmp_path, FLUX_RUN)
    to = str(tmp_path / "x")
    assert _main(["export", config, "--checkpoint", "base", "--to", to, "--lora-only", "--dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert "--lora-only: the run trains every weight (policy.lora is not set)" in err
    assert "--dtype: unknown dtype 'int3'" in err
    assert _main(["export", config, "--to", to]) == 2
    assert f"no checkpoint in {tmp_path / 'out'}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_model_card_tells_where_the_model_comes_from(trained, tmp_path):
    to = tmp_path / "export"
    assert _main(["export", trained, "--to", str(to)]) == 0
    card = (to / "README.md").read_text()
    record = json.loads((to / "dancecore_export.json").read_text())
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n")
    assert "- base model: dancecore flux preset 'tiny'" in card and "(iteration 1)" in card
    assert (
        "| brightness (`brightness`) | 1 |" in card
        and "| jpeg-compressibility (`jpeg-compressibility`) | 0.5 |" in card
    )
    assert "![reward curve](reward_curve.png)" in card and (to / "reward_curve.png").is_file()
    assert "| iteration | brightness |" in card and "| 1 | 0.6250 |" in card
    assert "## Training config" in card and "preset: tiny" in card
    assert f'from_pretrained("{to}")' in card
    assert record["dancecore_version"] and record["pipeline_class"] == "FluxPipeline" and record["iteration"] == 1
    assert json.loads((to / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_dtype_casts_every_written_weight(trained, tmp_path):
    from safetensors import safe_open

    to = tmp_path / "bf16"
    assert _main(["export", trained, "--to", str(to), "--dtype", "bf16"]) == 0
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        with safe_open(str(to / weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}, weights


def test_an_existing_directory_is_refused_unless_forced_and_a_failure_leaves_it_intact(
    trained, tmp_path, capsys, monkeypatch
):
    to = tmp_path / "export"
    to.mkdir()
    (to / "mine.txt").write_text("keep")
    assert _main(["export", trained, "--to", str(to)]) == 2
    assert "exists; choose another --to or pass --force" in capsys.readouterr().err
    import dancecore.export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dancecore.export, "write_card", broken)
    assert _main(["export", trained, "--to", str(to), "--force"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no staging directory is left behind"
    assert sorted(p.name for p in to.iterdir()) == ["mine.txt"]
    monkeypatch.undo()
    assert _main(["export", trained, "--to", str(to), "--force"]) == 0
    assert not (to / "mine.txt").exists() and (to / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
