"""``policy.attention_backend``: validation (CUDA, packages, what a policy offers) and how the backend
is applied to diffusers models (per layer, without touching diffusers' process-wide default)."""

from __future__ import annotations

import pytest
import torch

from dancecore.config.schema import validate
from dancecore.errors import ConfigError
from dancecore.plugin_kit.attention import (
    apply_attention_backend,
    attention_backend_of,
    attention_backend_problem,
    encoder_attention,
)
from tests.conftest import TINY_FLUX, TINY_RUN, deep_update

pytest.importorskip("diffusers")


def _run(tmp_path, **policy):
    return deep_update(TINY_RUN, {"output_dir": str(tmp_path / "run"), "policy": {**TINY_FLUX, **policy}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_validate_rejects_xformers_without_cuda_naming_the_key_and_the_install(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate(_run(tmp_path, attention_backend="xformers"))
    (message,) = info.value.errors
    assert message.startswith("policy.attention_backend:")
    assert "CUDA" in message and "pip install 'dancecore[xformers]'" in message


def test_validate_accepts_sdpa_and_native(tmp_path):
    for backend in ("sdpa", "native"):
        assert validate(_run(tmp_path, attention_backend=backend)).policy.config.attention_backend == backend
    assert validate(_run(tmp_path)).policy.config.attention_backend == "sdpa"


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "pip install 'dancecore[flash]'" in (attention_backend_problem("flash") or "")
    assert "the xformers package" in (attention_backend_problem("xformers") or "")
    assert attention_backend_problem("sdpa") is None
    assert "not offered" in (attention_backend_problem("flash", ("sdpa", "native")) or "")


def test_cpu_device_with_a_cuda_backend_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    data = deep_update(_run(tmp_path, attention_backend="xformers"), {"train": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="needs CUDA, but train.device is 'cpu'"):
        validate(data)


def test_backends_switch_per_layer_and_leave_diffusers_default_alone():
    from dancecore_flux.policy import TINY_SPEC as FLUX
    from dancecore_sd.policy import TINY_SPEC as SD
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    flux, unet = FluxTransformer2DModel(**FLUX["transformer"]), UNet2DConditionModel(**SD["unet"])
    for model in (flux, unet):
        assert attention_backend_of(model) == "sdpa"
        assert attention_backend_of(apply_attention_backend(model, "native")) == "native"
        assert attention_backend_of(apply_attention_backend(model, "sdpa")) == "sdpa"
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    with pytest.raises(ValueError, match="no flash-attn variant"):
        apply_attention_backend(unet, "flash")
    assert attention_backend_of(unet) == "sdpa", "a refused backend must change nothing"


def test_native_is_the_math_kernel_and_matches_sdpa():
    from dancecore_sd.policy import TINY_SPEC as SD
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD["unet"]).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 77, SD["unet"]["cross_attention_dim"])
    with torch.no_grad():
        fast = unet(x, t, text).sample
        slow = apply_attention_backend(unet, "native")(x, t, text).sample
    assert torch.allclose(fast, slow, atol=1e-4) and not torch.equal(fast, slow)


def test_encoders_get_eager_attention_only_for_native():
    assert encoder_attention("native") == {"attn_implementation": "eager"}
    assert encoder_attention("sdpa") == {} and encoder_attention("xformers") == {}
