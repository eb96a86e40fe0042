"""Parity of our DINOv2 with transformers' PyTorch Dinov2Model.

FPDM feeds DINOv2-large 512x512 images although it was trained at 518, so
the position-embedding resize is tested twice: the resize alone against
``torch.nn.functional.interpolate(mode="bicubic")``, and the whole model at
a size that needs it.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from fpdm_jax.importers.clip import export_clip_vision
from fpdm_jax.importers.dinov2 import export_dinov2, load_dinov2
from fpdm_jax.importers.hf_folder import CheckpointFolderError, ImportMismatchError
from fpdm_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from fpdm_jax.models.dinov2 import (
    Dinov2Config, Dinov2Model, bicubic_resize_like_torch)

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14, layerscale_value=0.5)


def _images(h=28, w=28, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)


def _torch_outputs(model, images):
  with torch.no_grad():
    out = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return dict(last_hidden_state=out.last_hidden_state.numpy(),
              pooler_output=out.pooler_output.numpy())


def _max_diffs(ours, ref):
  diffs = {}
  for key, expected in ref.items():
    got = np.asarray(getattr(ours, key), np.float32)
    assert got.shape == expected.shape, (key, got.shape, expected.shape)
    diffs[key] = float(np.abs(got - expected).max())
  return diffs


def _hf_model(seed=0, **overrides):
  torch.manual_seed(seed)
  model = transformers.Dinov2Model(transformers.Dinov2Config(**(TINY | overrides))).eval()
  with torch.no_grad():  # non-trivial values for parameters initialised to constants
    for name, p in model.named_parameters():
      if "lambda1" in name or "mask_token" in name or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
  model = _hf_model()
  folder = tmp_path_factory.mktemp("dinov2")
  model.save_pretrained(folder)
  return folder, model


@pytest.mark.parametrize("in_hw,out_hw", [
    ((37, 37), (36, 36)),   # dinov2-large at 504/512 px
    ((2, 2), (3, 4)), ((5, 7), (11, 3)), ((4, 4), (1, 1)), ((6, 6), (6, 6)),
])
def test_bicubic_resize_matches_torch(in_hw, out_hw):
  x = np.random.RandomState(0).randn(1, *in_hw, 8).astype(np.float32)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bicubic",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(bicubic_resize_like_torch(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)
  # jax.image.resize is NOT a substitute (different cubic kernel): guard the premise.
  if in_hw != out_hw:
    theirs = np.asarray(jax_resize(x, out_hw))
    assert np.abs(theirs - ref).max() > 1e-3


def jax_resize(x, hw):
  import jax
  return jax.image.resize(jnp.asarray(x), (x.shape[0], *hw, x.shape[-1]), "bicubic")


@pytest.mark.parametrize("h,w", [(28, 28), (42, 56), (56, 42)])
def test_parity_native_and_interpolated(dino_folder, h, w):
  folder, ref = dino_folder
  model = load_dinov2(folder)
  images = _images(h, w)
  diffs = _max_diffs(model(jnp.asarray(images)), _torch_outputs(ref, images))
  assert max(diffs.values()) < TOL, diffs


def test_pickled_bin_with_transformers5_names(tmp_path):
  """``torch.save(model.state_dict())`` has the in-memory names (q_proj, ...)
  and, for dinov2-giant, a SwiGLU MLP; both must import."""
  ref = _hf_model(seed=3, use_swiglu_ffn=True)
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(ref.config.to_json_string())
  model = load_dinov2(tmp_path)
  images = _images(42, 42, seed=1)
  diffs = _max_diffs(model(jnp.asarray(images)), _torch_outputs(ref, images))
  assert max(diffs.values()) < TOL, diffs


def test_swiglu_export_round_trip(tmp_path):
  ref = _hf_model(seed=4, use_swiglu_ffn=True)
  ref.save_pretrained(tmp_path / "hub")  # fused weights_in layout
  model = load_dinov2(tmp_path / "hub")
  export_dinov2(model, tmp_path / "ours")
  back = transformers.Dinov2Model.from_pretrained(tmp_path / "ours").eval()
  images = _images(seed=2)
  diffs = _max_diffs(model(jnp.asarray(images)), _torch_outputs(back, images))
  assert max(diffs.values()) < TOL, diffs


def test_export_round_trip(dino_folder, tmp_path):
  folder, _ = dino_folder
  model = load_dinov2(folder)
  export_dinov2(model, tmp_path / "exported")
  ref = transformers.Dinov2Model.from_pretrained(tmp_path / "exported").eval()
  images = _images(42, 56, seed=3)
  diffs = _max_diffs(model(jnp.asarray(images)), _torch_outputs(ref, images))
  assert max(diffs.values()) < TOL, diffs
  # mask_token survives the trip (import consumed it, export wrote it back).
  np.testing.assert_array_equal(ref.embeddings.mask_token.detach().numpy(),
                                np.asarray(model.embeddings.mask_token[...]))


def test_bool_masked_pos_matches(dino_folder):
  folder, ref = dino_folder
  model = load_dinov2(folder)
  images = _images(seed=4)
  mask = np.array([[True, False, False, True], [False, True, False, False]])
  with torch.no_grad():
    out = ref(torch.from_numpy(images).permute(0, 3, 1, 2),
              bool_masked_pos=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours = np.asarray(model(jnp.asarray(images), jnp.asarray(mask)).last_hidden_state)
  assert np.abs(ours - out).max() < TOL


def test_bfloat16_compute_close_to_float32(dino_folder):
  """bf16 compute with f32 params: relative L2 error < 2e-2 (at an interpolated size)."""
  folder, _ = dino_folder
  f32, bf16 = load_dinov2(folder), load_dinov2(folder, dtype=jnp.bfloat16)
  images = jnp.asarray(_images(42, 56, seed=5))
  a, b = f32(images), bf16(images)
  assert b.last_hidden_state.dtype == jnp.bfloat16
  for key in ("last_hidden_state", "pooler_output"):
    x, y = np.asarray(getattr(a, key)), np.asarray(getattr(b, key), np.float32)
    rel = np.linalg.norm(x - y) / np.linalg.norm(x)
    assert rel < 2e-2, f"{key}: relative error {rel}"


def test_remat_and_drop_path():
  cfg = Dinov2Config.tiny(remat=True, drop_path_rate=0.5)
  model = Dinov2Model(cfg, rngs=nnx.Rngs(0))
  images = jnp.asarray(_images())
  model.eval()  # drop path off: deterministic
  a, b = model(images).last_hidden_state, model(images).last_hidden_state
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model.train()
  grads = nnx.grad(lambda m: jnp.sum(m(images).last_hidden_state ** 2))(model)
  g = grads["encoder"]["layer"][0]["mlp"]["fc1"]["kernel"][...]
  assert np.isfinite(np.asarray(g)).all()


def test_full_size_parameter_count():
  ours = Dinov2Config.large()
  abstract = nnx.eval_shape(lambda: Dinov2Model(ours, rngs=nnx.Rngs(0)))
  n_ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  hf = ours.to_hf_dict()
  hf.pop("architectures")
  with torch.device("meta"):
    ref = transformers.Dinov2Model(transformers.Dinov2Config(**hf))
  assert n_ours == sum(p.numel() for p in ref.parameters())
  assert n_ours == 304_368_640  # dinov2-large, as published (304M)


def test_wrong_folders_give_clear_errors(dino_folder, tmp_path):
  folder, ref = dino_folder
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointFolderError, match="config.json is missing"):
    load_dinov2(tmp_path / "empty")
  clip = CLIPVisionModelWithProjection(CLIPVisionConfig.tiny(), rngs=nnx.Rngs(0))
  export_clip_vision(clip, tmp_path / "clip")
  with pytest.raises(CheckpointFolderError, match="'clip_vision_model' model.*not DINOv2"):
    load_dinov2(tmp_path / "clip")
  # A config without the mask token cannot silently drop the checkpoint's one.
  with pytest.raises(ImportMismatchError, match=r"no parameter takes.*mask_token"):
    load_dinov2(folder, use_mask_token=False)


def test_fpdm_source_resolution_under_jit(tmp_path):
  """The FPDM use: a 518-px checkpoint (37x37 positions) fed 512x512 sources
  (36x36 patches), run under ``nnx.jit`` as the training step would."""
  ref = _hf_model(seed=5, image_size=518)
  ref.save_pretrained(tmp_path)
  model = load_dinov2(tmp_path)
  images = _images(512, 512, batch=1, seed=6)
  out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  assert out.last_hidden_state.shape == (1, 1 + 36 * 36, 32)
  diffs = _max_diffs(out, _torch_outputs(ref, images))
  assert max(diffs.values()) < TOL, diffs
