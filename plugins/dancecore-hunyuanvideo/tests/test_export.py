"""`dancecore export` of tiny HunyuanVideo (HunyuanVideoPipeline) and SkyReels-I2V
(HunyuanSkyreelsImageToVideoPipeline) models: loaded by from_pretrained, they reproduce `dancecore eval`."""

from __future__ import annotations

from dancecore.testing import check_diffusers_export

SAMPLER = {"name": "flow-sde", "num_steps": 3, "shift": 5.0, "eta": 0.25}


def test_export_loads_in_hunyuanvideo_pipeline_and_reproduces_eval(tmp_path):
    """Full fine-tuning here; the LoRA path (same components, same LoRA loader) in the SkyReels test."""
    check_diffusers_export({"name": "hunyuanvideo", "preset": "tiny"}, SAMPLER, tmp_path)


def test_skyreels_lora_export_loads_in_the_skyreels_i2v_pipeline_and_reproduces_eval(tmp_path, make_image, monkeypatch):
    import json

    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_skyreels_image2video as skyreels

    # dancecore conditions on the first frame's posterior mode; diffusers samples the posterior.
    # With the pipeline's own "argmax" mode (the posterior mode) the rest agrees within the kit's tolerance.
    sample = skyreels.retrieve_latents
    monkeypatch.setattr(skyreels, "retrieve_latents", lambda out, generator=None: sample(out, generator, "argmax"))
    lines = [
        {"prompt": text, "image": make_image(tmp_path / f"{i}.png", 32, 48, i)}
        for i, text in enumerate(["a red cube", "a dog"])
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    policy = {"name": "skyreels-i2v", "preset": "tiny", "cfg_scale": 3.0, "lora": {"rank": 2, "alpha": 4}}
    check = check_diffusers_export(policy, {**SAMPLER, "shift": 7.0}, tmp_path, prompts=prompts)
    assert check.adapter_vs_merged is not None
