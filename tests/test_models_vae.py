"""Parity of our AutoencoderKL with diffusers' (tiny config, float32, < 1e-4)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fpdm_jax.importers import hf_folder
from fpdm_jax.importers.vae import export_vae, load_vae
from fpdm_jax.models.vae import (
    SD_VAE_CONFIG, SD_VAE_DIFFUSERS_CONFIG, TINY_VAE_CONFIG, AutoencoderKL, DiagonalGaussian,
    VAEConfig)

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as TorchVAE  # noqa: E402

TOL = 1e-4


def _nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _np_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.manual_seed(0)
  cfg = {k: v for k, v in TINY_VAE_CONFIG.to_diffusers_dict().items() if not k.startswith("_")}
  vae = TorchVAE(**cfg).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # norms off identity, and a logvar range that is not clipped
    for p in vae.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  folder = tmp_path_factory.mktemp("vae")
  vae.save_pretrained(folder)
  return vae, folder


@nnx.jit
def _encode(model, x):
  return model.encode(x)


@nnx.jit
def _decode(model, z):
  return model.decode(z)


def test_encode_and_decode_match_diffusers(tiny):
  vae, folder = tiny
  model = load_vae(folder)
  x = torch.rand(2, 3, 32, 24) * 2 - 1
  z = torch.randn(2, 4, 16, 12)
  with torch.no_grad():
    posterior = vae.encode(x).latent_dist
    ref_dec = _np_nhwc(vae.decode(z).sample)
  ours = _encode(model, _nhwc(x))
  assert isinstance(ours, DiagonalGaussian) and ours.mean.shape == (2, 16, 12, 4)
  np.testing.assert_allclose(np.asarray(ours.mean), _np_nhwc(posterior.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.logvar), _np_nhwc(posterior.logvar), atol=TOL, rtol=0)
  dec = np.asarray(_decode(model, _nhwc(z)))
  assert dec.shape == (2, 32, 24, 3)
  np.testing.assert_allclose(dec, ref_dec, atol=TOL, rtol=0)
  # Scaled latents and sampling.
  np.testing.assert_allclose(model.encode_to_latents(_nhwc(x)),
                             np.asarray(ours.mean) * 0.18215, atol=TOL, rtol=0)
  s1, s2 = ours.sample(jax.random.key(0)), ours.sample(jax.random.key(1))
  assert s1.shape == ours.mean.shape and not np.allclose(s1, s2)
  np.testing.assert_allclose(np.asarray(ours.kl()), posterior.kl().numpy(), rtol=1e-4)


def test_legacy_attention_names_are_read(tiny, tmp_path):
  """The SD 1.x/2.x VAEs on the Hub still name the mid attention query/key/value/proj_attn."""
  vae, folder = tiny
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in hf_folder.load_state_dict(folder).items():
    for new, old in legacy.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    sd[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in sd
  hf_folder.save_safetensors(sd, tmp_path, "diffusion_pytorch_model.safetensors",
                             config=json.loads((folder / "config.json").read_text()))
  a, b = load_vae(folder), load_vae(tmp_path)
  for (k, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                            nnx.to_flat_state(nnx.state(b, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(k))


def test_full_size_parameter_count_matches_diffusers():
  cfg = {k: v for k, v in SD_VAE_DIFFUSERS_CONFIG.items() if not k.startswith("_")}
  with torch.device("meta"):
    ref = sum(p.numel() for p in TorchVAE(**cfg).parameters())
  assert ref == 83_653_863  # SD's VAE
  abstract = nnx.eval_shape(lambda: AutoencoderKL(SD_VAE_CONFIG, rngs=nnx.Rngs(0)))
  ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert ours == ref
  assert SD_VAE_CONFIG.scaling_factor == 0.18215


def test_bfloat16_decode_close_to_float32(tiny):
  """bf16 activations, f32 params: within 5% of the output scale (max-abs)."""
  _, folder = tiny
  z = jax.random.normal(jax.random.key(0), (1, 16, 12, 4))
  ref = np.asarray(_decode(load_vae(folder), z))
  out = _decode(load_vae(folder, dtype=jnp.bfloat16), z)
  assert out.dtype == jnp.bfloat16
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_export_round_trip_through_diffusers(tiny, tmp_path):
  vae, folder = tiny
  export_vae(load_vae(folder), tmp_path)
  reloaded = TorchVAE.from_pretrained(tmp_path).eval()
  x = torch.rand(1, 3, 32, 24) * 2 - 1
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(x).sample.numpy(), vae(x).sample.numpy(), atol=1e-6, rtol=0)
  assert reloaded.config.scaling_factor == pytest.approx(0.18215)


def test_wrong_or_incomplete_folders_give_clear_errors(tiny, tmp_path):
  _, folder = tiny
  sd = hf_folder.load_state_dict(folder)
  del sd["decoder.conv_out.bias"]
  hf_folder.save_safetensors(sd, tmp_path / "missing", "diffusion_pytorch_model.safetensors",
                             config=json.loads((folder / "config.json").read_text()))
  with pytest.raises(hf_folder.ImportMismatchError, match="decoder.conv_out.bias"):
    load_vae(tmp_path / "missing")
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
  with pytest.raises(hf_folder.CheckpointFolderError, match="not a AutoencoderKL"):
    load_vae(tmp_path / "unet")
  with pytest.raises(hf_folder.CheckpointFolderError, match="neither config.json nor vae/"):
    load_vae(tmp_path)
  with pytest.raises(ValueError, match="use_quant_conv=False"):
    VAEConfig.from_diffusers_dict(dict(SD_VAE_DIFFUSERS_CONFIG, use_quant_conv=False))
