"""Parity of our CLIP vision tower with transformers' PyTorch CLIP.

Tiny random transformers models are saved as Hugging Face folders, read back
through ``fpdm_jax.importers.clip`` and run on the same images; the outputs
must agree to 1e-4 in float32. Full-size parameter counts are compared
without allocating (``nnx.eval_shape`` vs a torch model on the meta device).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from fpdm_jax.importers.clip import (
    export_clip_vision, load_clip_vision, clip_vision_params_from_torch)
from fpdm_jax.importers.dinov2 import export_dinov2
from fpdm_jax.importers.hf_folder import CheckpointFolderError, ImportMismatchError
from fpdm_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from fpdm_jax.models.dinov2 import Dinov2Config, Dinov2Model

TOL = 1e-4
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)


def _images(h=28, w=28, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)


def _torch_outputs(model, images, **kw):
  """transformers outputs as numpy; ``model`` is a CLIPVisionModelWithProjection
  or a CLIPModel (both have ``vision_model`` and ``visual_projection``)."""
  with torch.no_grad():
    out = model.vision_model(torch.from_numpy(images).permute(0, 3, 1, 2), **kw)
    embeds = model.visual_projection(out.pooler_output)
  return dict(last_hidden_state=out.last_hidden_state.numpy(),
              pooler_output=out.pooler_output.numpy(), image_embeds=embeds.numpy())


def _assert_parity(ours, ref, tol=TOL):
  for key, expected in ref.items():
    got = np.asarray(getattr(ours, key), np.float32)
    assert got.shape == expected.shape, key
    diff = np.abs(got - expected).max()
    assert diff < tol, f"{key}: max abs diff {diff}"


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**TINY_VISION)).eval()
  folder = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(folder)
  return folder, model


@pytest.fixture(scope="module")
def full_clip_folder(tmp_path_factory):
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      vision_config=TINY_VISION | dict(projection_dim=512),  # stale nested value, as on the Hub
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  folder = tmp_path_factory.mktemp("clip_full")
  model.save_pretrained(folder)
  return folder, model


def test_vision_folder_parity(vision_folder):
  folder, ref = vision_folder
  model = load_clip_vision(folder)
  images = _images()
  _assert_parity(model(jnp.asarray(images)), _torch_outputs(ref, images))


def test_interpolated_positions_parity(vision_folder):
  folder, ref = vision_folder
  model = load_clip_vision(folder)
  images = _images(42, 56)
  out = model(jnp.asarray(images), interpolate_pos_encoding=True)
  _assert_parity(out, _torch_outputs(ref, images, interpolate_pos_encoding=True))
  with pytest.raises(ValueError, match="doesn't match model"):
    model(jnp.asarray(images))


def test_full_clip_folder_parity(full_clip_folder):
  folder, ref = full_clip_folder
  model = load_clip_vision(folder)
  # The top-level projection_dim wins over the nested vision_config one.
  assert model.config.projection_dim == 24
  images = _images(seed=1)
  _assert_parity(model(jnp.asarray(images)), _torch_outputs(ref, images))
  # Only the text tower and the contrastive scalars are dropped.
  _, ignored = clip_vision_params_from_torch(
      {k: v.numpy() for k, v in ref.state_dict().items()})
  assert ignored and all(k.startswith(("text_model.", "text_projection.", "logit_scale"))
                         for k in ignored)


def test_pickled_bin_folder_parity(vision_folder, tmp_path):
  # transformers 5 always writes safetensors (safe_serialization=False is
  # ignored), so write the .bin folder as older releases did.
  _, ref = vision_folder
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(ref.config.to_json_string())
  model = load_clip_vision(tmp_path)
  images = _images(seed=2)
  _assert_parity(model(jnp.asarray(images)), _torch_outputs(ref, images))


def test_bfloat16_compute_close_to_float32(vision_folder):
  """bf16 compute with f32 params: relative L2 error < 2e-2 on every output."""
  folder, _ = vision_folder
  f32 = load_clip_vision(folder)
  bf16 = load_clip_vision(folder, dtype=jnp.bfloat16)
  images = jnp.asarray(_images(seed=3))
  a, b = f32(images), bf16(images)
  assert b.image_embeds.dtype == jnp.bfloat16
  assert nnx.state(bf16, nnx.Param)["visual_projection"]["kernel"][...].dtype == jnp.float32
  for key in ("last_hidden_state", "pooler_output", "image_embeds"):
    x, y = np.asarray(getattr(a, key)), np.asarray(getattr(b, key), np.float32)
    rel = np.linalg.norm(x - y) / np.linalg.norm(x)
    assert rel < 2e-2, f"{key}: relative error {rel}"


def test_remat_matches_and_differentiates(vision_folder):
  folder, _ = vision_folder
  plain, remat = load_clip_vision(folder), load_clip_vision(folder, remat=True)
  images = jnp.asarray(_images(seed=4))
  np.testing.assert_allclose(np.asarray(remat(images).image_embeds),
                             np.asarray(plain(images).image_embeds), atol=1e-6)

  def loss(model):
    return jnp.sum(model(images).image_embeds ** 2)

  grads = nnx.grad(loss)(remat)
  g = grads["vision_model"]["encoder"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("name,ours", [
    ("vit_l14", CLIPVisionConfig.vit_l14()),
    ("vit_b16", CLIPVisionConfig.vit_b16()),
])
def test_full_size_parameter_count(name, ours):
  abstract = nnx.eval_shape(lambda: CLIPVisionModelWithProjection(ours, rngs=nnx.Rngs(0)))
  n_ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  hf_config = transformers.CLIPVisionConfig(**ours.to_hf_dict())
  with torch.device("meta"):
    ref = transformers.CLIPVisionModelWithProjection(hf_config)
  n_ref = sum(p.numel() for p in ref.parameters())
  assert n_ours == n_ref
  if name == "vit_l14":
    assert n_ours == 303_966_208  # ViT-L/14 vision tower + projection, counted by hand


def test_from_hf_dict_both_config_kinds():
  vision = dict(TINY_VISION, model_type="clip_vision_model")
  full = dict(model_type="clip", projection_dim=768, vision_config=dict(TINY_VISION))
  assert CLIPVisionConfig.from_hf_dict(vision) == CLIPVisionConfig.tiny()
  assert CLIPVisionConfig.from_hf_dict(full).projection_dim == 768
  legacy = dict(full, vision_config={}, vision_config_dict=dict(TINY_VISION))
  assert CLIPVisionConfig.from_hf_dict(legacy).hidden_size == 32
  # transformers reads the legacy dict the same way.
  parsed = transformers.CLIPConfig(**legacy).vision_config.to_dict()
  assert CLIPVisionConfig.from_hf_dict(parsed | {"projection_dim": 768}) == \
      CLIPVisionConfig.from_hf_dict(legacy)
  # Defaults are transformers' (a config.json may leave fields out).
  assert CLIPVisionConfig.from_hf_dict({}) == CLIPVisionConfig.from_hf_dict(
      transformers.CLIPVisionConfig().to_dict())


def test_export_round_trip(vision_folder, tmp_path):
  folder, _ = vision_folder
  model = load_clip_vision(folder)
  export_clip_vision(model, tmp_path / "exported")
  ref = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "exported").eval()
  images = _images(seed=5)
  _assert_parity(model(jnp.asarray(images)), _torch_outputs(ref, images))
  # And our importer reads what the exporter wrote.
  again = load_clip_vision(tmp_path / "exported")
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(images)).image_embeds),
                                np.asarray(model(jnp.asarray(images)).image_embeds))


def test_wrong_folders_give_clear_errors(vision_folder, tmp_path):
  folder, ref = vision_folder
  with pytest.raises(CheckpointFolderError, match="does not exist"):
    load_clip_vision(tmp_path / "nowhere")
  (tmp_path / "no_config").mkdir()
  with pytest.raises(CheckpointFolderError, match="config.json is missing"):
    load_clip_vision(tmp_path / "no_config")
  dino = Dinov2Model(Dinov2Config.tiny(), rngs=nnx.Rngs(0))
  export_dinov2(dino, tmp_path / "dino")
  with pytest.raises(CheckpointFolderError, match="'dinov2' model.*not CLIP"):
    load_clip_vision(tmp_path / "dino")
  # Config and weights of different sizes: the mismatch is listed by name.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
  (bad / "config.json").write_text(json.dumps(ref.config.to_dict() | {"intermediate_size": 48}))
  with pytest.raises(ImportMismatchError, match=r"shape mismatches.*mlp\.fc1\.kernel"):
    load_clip_vision(bad)
  # A tensor nobody takes is reported, not dropped.
  sd = dict(ref.state_dict())
  sd["vision_model.extra_head.weight"] = torch.zeros(2, 2)
  torch.save(sd, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(ref.config.to_json_string())
  with pytest.raises(ImportMismatchError, match=r"no parameter takes.*extra_head"):
    load_clip_vision(tmp_path)


def test_gradients_match_torch(vision_folder):
  """Stage 1 trains this tower: the gradients of the position table (a sum
  over the batch, ``clip.add_to_every_row``), the layer norms' scales and a
  matmul's kernel agree with torch's."""
  folder, ref = vision_folder
  model = load_clip_vision(folder)
  images = _images(batch=3, seed=5)
  rng = np.random.RandomState(6)
  w_embeds = rng.randn(3, TINY_VISION["projection_dim"]).astype(np.float32)
  w_hidden = rng.randn(3, 5, TINY_VISION["hidden_size"]).astype(np.float32)

  def loss(model):
    out = model(jnp.asarray(images))
    return (jnp.sum(out.image_embeds * w_embeds)
            + jnp.sum(jnp.sin(out.last_hidden_state) * w_hidden))

  grads = nnx.grad(loss)(model)["vision_model"]
  ref.zero_grad()
  out = ref.vision_model(torch.from_numpy(images).permute(0, 3, 1, 2))
  t_loss = ((ref.visual_projection(out.pooler_output) * torch.from_numpy(w_embeds)).sum()
            + (torch.sin(out.last_hidden_state) * torch.from_numpy(w_hidden)).sum())
  t_loss.backward()
  tv = ref.vision_model
  layer = grads["encoder"]["layers"][0]
  pairs = {
      "position table": (grads["embeddings"]["position_embedding"],
                         tv.embeddings.position_embedding.weight.grad),
      "pre-norm scale": (grads["pre_layernorm"]["scale"], tv.pre_layrnorm.weight.grad),
      "pre-norm bias": (grads["pre_layernorm"]["bias"], tv.pre_layrnorm.bias.grad),
      "layer norm 1 scale": (layer["layer_norm1"]["scale"],
                             tv.encoder.layers[0].layer_norm1.weight.grad),
      "fc1 kernel": (layer["mlp"]["fc1"]["kernel"],
                     tv.encoder.layers[0].mlp.fc1.weight.grad.T),
  }
  for name, (ours, theirs) in pairs.items():
    np.testing.assert_allclose(np.asarray(ours[...]), theirs.numpy(), rtol=1e-4, atol=1e-5,
                               err_msg=name)
