"""Parity of our UNet2DConditionModel (and FPDM's additions) with diffusers.

Tiny configs with randomly perturbed weights (so norms and zero-initialised
layers are not identity/zero), float32, max-abs difference < 1e-4.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fpdm_jax import sampling, schedulers
from fpdm_jax.importers import hf_folder
from fpdm_jax.importers.unet import export_unet, load_unet, torch_to_flax
from fpdm_jax.models.conditioning import ClassEmbeddingMLP, PoseEmbedding
from fpdm_jax.models.unet import (
    FPDM_UNET_CONFIG, SD21_UNET_CONFIG, SD21_UNET_DIFFUSERS_CONFIG, TINY_UNET_CONFIG,
    UNet2DConditionModel, UNetConfig)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel as TorchUNet  # noqa: E402
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding  # noqa: E402

TOL = 1e-4
# Latents 16x13: 13 is odd, so the up block must upsample to the skip's size.
H, W, T = 16, 13, 7


def _diffusers_kwargs(config: UNetConfig) -> dict:
  return {k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")}


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
  """Adds noise to every parameter: norms stop being identity, zero convs stop being zero."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))


def _inputs(seed=0, batch=2, ctx_dim=32):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, 4, H, W, generator=g)
  t = torch.tensor([10, 731][:batch])
  ctx = torch.randn(batch, T, ctx_dim, generator=g)
  return x, t, ctx


def _nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _to_nhwc_np(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


@nnx.jit
def _forward(model, x, t, ctx):
  return model(x, t, ctx)


@nnx.jit
def _forward_fpdm(model, x, t, ctx, pose_image, fusion):
  pose, cls = model.embed_conditions(pose_image, fusion)
  return model(x, t, ctx, pose_features=pose, class_embedding=cls)


@nnx.jit
def _forward_pose_only(model, x, t, ctx, pose_image):
  pose, _ = model.embed_conditions(pose_image)
  return model(x, t, ctx, pose_features=pose)


def _tiny_torch_unet(config: UNetConfig, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  unet = TorchUNet(**_diffusers_kwargs(config)).eval()
  _perturb(unet, seed + 1)
  return unet


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
  unet = _tiny_torch_unet(TINY_UNET_CONFIG)
  folder = tmp_path_factory.mktemp("sd2_unet")
  unet.save_pretrained(folder)
  return unet, folder


def test_sd2_style_unet_matches_diffusers(sd2_folder):
  unet, folder = sd2_folder
  x, t, ctx = _inputs()
  with torch.no_grad():
    ref = _to_nhwc_np(unet(x, t, ctx).sample)
  model = load_unet(folder)
  assert not model.config.fpdm and model.pose_embedding is None
  out = np.asarray(_forward(model, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())))
  assert out.shape == (2, H, W, 4)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_sd1_style_unet_matches_diffusers(tmp_path):
  """Conv projections in the transformers, one head count for all blocks, no upcast."""
  config = dataclasses.replace(TINY_UNET_CONFIG, use_linear_projection=False,
                               upcast_attention=False, attention_head_dim=4)
  unet = _tiny_torch_unet(config, seed=3)
  unet.save_pretrained(tmp_path)
  x, t, ctx = _inputs(seed=1)
  with torch.no_grad():
    ref = _to_nhwc_np(unet(x, t, ctx).sample)
  model = load_unet(tmp_path)
  assert model.down_blocks[0].attentions[0].proj_in.kernel.shape == (1, 1, 32, 32)
  out = np.asarray(_forward(model, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())))
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def _torch_fpdm_unet(config: UNetConfig, seed: int = 5):
  """diffusers UNet with FPDM's additions wired the way the reference does:
  ``unet.class_embedding`` = the MLP (diffusers adds it to the time embedding
  given ``class_labels``), the pose embedding's output added to ``conv_in``'s
  output by a forward hook."""
  unet = _tiny_torch_unet(config, seed=seed)
  torch.manual_seed(seed + 10)
  d = config.class_embed_input_dim
  unet.class_embedding = torch.nn.Sequential(
      torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Dropout(0.2),
      torch.nn.Linear(d, config.time_embed_dim), torch.nn.Dropout(0.2))
  unet.pose_embedding = ControlNetConditioningEmbedding(
      config.block_out_channels[0], conditioning_channels=config.pose_conditioning_channels,
      block_out_channels=config.pose_embedding_channels)
  _perturb(unet.class_embedding, seed + 11, scale=0.1)
  _perturb(unet.pose_embedding, seed + 12, scale=0.1)
  unet.eval()
  state = {}
  unet.conv_in.register_forward_hook(lambda mod, inp, out: out + state["pose"])

  def forward(x, t, ctx, pose_image, fusion):
    state["pose"] = unet.pose_embedding(pose_image)
    return unet(x, t, ctx, class_labels=fusion).sample

  return unet, forward


def _fpdm_inputs(config, seed=2):
  g = torch.Generator().manual_seed(seed)
  pose = torch.randn(2, 3, 8 * H, 8 * W, generator=g)
  fusion = torch.randn(2, config.class_embed_input_dim, generator=g)
  return pose, fusion


def test_fpdm_unet_matches_diffusers_with_additions(tmp_path):
  config = dataclasses.replace(TINY_UNET_CONFIG, fpdm=True)
  unet, forward = _torch_fpdm_unet(config)
  unet.save_pretrained(tmp_path)  # writes class_embedding.* and pose_embedding.* too
  x, t, ctx = _inputs(seed=4)
  pose, fusion = _fpdm_inputs(config)
  with torch.no_grad():
    ref = _to_nhwc_np(forward(x, t, ctx, pose, fusion))
    without = _to_nhwc_np(forward(x, t, ctx, pose * 0, fusion * 0))
  assert np.abs(ref - without).max() > 1e-2  # the conditions matter in this test
  # The folder's config has no FPDM section: the additions are found from the
  # weights; their sizes (tiny here) come from the overrides.
  model = load_unet(tmp_path, class_embed_input_dim=config.class_embed_input_dim,
                    pose_embedding_channels=config.pose_embedding_channels)
  assert model.config.fpdm
  out = np.asarray(_forward_fpdm(model, _nhwc(x), jnp.asarray(t.numpy()),
                                 jnp.asarray(ctx.numpy()), _nhwc(pose),
                                 jnp.asarray(fusion.numpy())))
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_pose_embedding_matches_controlnet_conditioning_embedding():
  torch.manual_seed(0)
  ref_module = ControlNetConditioningEmbedding(320).eval()
  assert not any(p.abs().sum() for p in ref_module.conv_out.parameters())
  ours = PoseEmbedding(320, rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(ours.conv_out.kernel.get_value()))
  assert not np.any(np.asarray(ours.conv_out.bias.get_value()))
  _perturb(ref_module, 1, scale=0.05)
  sd = {k: v.numpy() for k, v in ref_module.state_dict().items()}
  hf_folder.assign_params(ours, torch_to_flax(sd))
  image = torch.randn(2, 3, 64, 40)  # W/8 = 5: odd sizes keep PyTorch's symmetric padding honest
  with torch.no_grad():
    ref = _to_nhwc_np(ref_module(image))
  out = np.asarray(nnx.jit(lambda m, x: m(x))(ours, _nhwc(image)))
  assert out.shape == (2, 8, 5, 320)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_class_embedding_mlp_dropout():
  mlp = ClassEmbeddingMLP(24, 40, rngs=nnx.Rngs(0))
  x = jnp.ones((3, 24))
  a = mlp(x)
  np.testing.assert_array_equal(a, mlp(x, deterministic=True))
  b = mlp(x, deterministic=False, rngs=jax.random.key(1))
  assert b.shape == (3, 40) and not np.allclose(a, b)
  with pytest.raises(ValueError, match="rngs"):
    mlp(x, deterministic=False)


def test_plain_sd_folder_into_fpdm_unet_starts_as_plain(sd2_folder):
  _, folder = sd2_folder
  plain = load_unet(folder)
  fpdm = load_unet(folder, fpdm=True, class_embed_input_dim=24,
                   pose_embedding_channels=(4, 8, 8, 16))
  assert fpdm.config.fpdm
  assert not np.any(np.asarray(fpdm.pose_embedding.conv_out.kernel.get_value()))
  x, t, ctx = _inputs()
  pose, _ = _fpdm_inputs(TINY_UNET_CONFIG)
  out = _forward_pose_only(fpdm, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                           _nhwc(pose))
  ref = _forward(plain, _nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)


def _count_torch(module) -> int:
  return sum(p.numel() for p in module.parameters())


def _count_ours(factory) -> dict[str, int]:
  """Parameter counts per top-level submodule, without allocating."""
  counts = {}
  abstract = nnx.eval_shape(factory)
  for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    counts[path[0]] = counts.get(path[0], 0) + int(np.prod(v.shape))
  return counts


def test_full_size_parameter_counts_match_diffusers():
  cfg = {k: v for k, v in SD21_UNET_DIFFUSERS_CONFIG.items() if not k.startswith("_")}
  with torch.device("meta"):
    ref_unet = _count_torch(TorchUNet(**cfg))
    ref_pose = _count_torch(ControlNetConditioningEmbedding(320))
    ref_mlp = _count_torch(torch.nn.Sequential(
        torch.nn.Linear(768, 768), torch.nn.GELU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(768, 1280), torch.nn.Dropout(0.2)))
  assert ref_unet == 865_910_724  # SD 2.1's published UNet size
  counts = _count_ours(lambda: UNet2DConditionModel(FPDM_UNET_CONFIG, rngs=nnx.Rngs(0)))
  assert sum(n for k, n in counts.items() if k not in ("pose_embedding", "class_embedding")) == ref_unet
  assert counts["pose_embedding"] == ref_pose and counts["class_embedding"] == ref_mlp
  fpdm = sum(counts.values())
  assert fpdm == ref_unet + ref_pose + ref_mlp


def test_bfloat16_compute_close_to_float32(sd2_folder):
  """bf16 activations, f32 params: within 5% of the output scale (max-abs)."""
  _, folder = sd2_folder
  f32 = load_unet(folder)
  bf16 = load_unet(folder, dtype=jnp.bfloat16)
  assert bf16.conv_in.kernel.get_value().dtype == jnp.float32
  x, t, ctx = _inputs()
  args = (_nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
  ref = np.asarray(_forward(f32, *args))
  out = _forward(bf16, *args)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err


def test_remat_same_outputs_and_gradients(sd2_folder):
  """Gradients through the checkpointed blocks (w.r.t. the input: cheaper to
  compile than all weight gradients, and it crosses every block)."""
  _, folder = sd2_folder
  x, t, ctx = _inputs(batch=1)
  t, ctx = jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())

  @nnx.jit
  def loss_and_grad(model, x):
    return nnx.value_and_grad(lambda m, x: jnp.mean(m(x, t, ctx) ** 2), argnums=1)(model, x)

  loss_a, grad_a = loss_and_grad(load_unet(folder), _nhwc(x))
  loss_b, grad_b = loss_and_grad(load_unet(folder, remat=True), _nhwc(x))
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  assert np.abs(np.asarray(grad_a)).max() > 0
  np.testing.assert_allclose(np.asarray(grad_a), np.asarray(grad_b), atol=1e-6, rtol=1e-4)


def test_remat_unet_samples_inside_the_jitted_loop(sd2_folder):
  """nnx.remat in the blocks must also trace inside the sampler's fori_loop
  (the reference stage-2 config trains with remat=True and samples the same
  model), and change nothing in what it computes."""
  _, folder = sd2_folder
  x, _, ctx = _inputs(batch=2)
  cond = sampling.Conditions(None, jnp.asarray(ctx.numpy()), None)
  keys = sampling.sample_keys(0, jnp.arange(2))
  schedule = schedulers.make_sampler_schedule("ddim", schedulers.SchedulerConfig(), 2)
  run = nnx.jit(functools.partial(sampling.sample, schedule=schedule, shape=_nhwc(x).shape[1:],
                                  guidance=1.0))
  plain = np.asarray(run(load_unet(folder), cond, keys))
  remat = np.asarray(run(load_unet(folder, remat=True), cond, keys))
  assert np.isfinite(plain).all() and np.abs(plain).max() > 0
  np.testing.assert_allclose(remat, plain, atol=1e-5, rtol=1e-5)


def test_export_round_trip_through_diffusers(sd2_folder, tmp_path):
  unet, folder = sd2_folder
  model = load_unet(folder)
  export_unet(model, tmp_path / "plain")
  reloaded = TorchUNet.from_pretrained(tmp_path / "plain").eval()
  x, t, ctx = _inputs()
  with torch.no_grad():
    ref = unet(x, t, ctx).sample
    np.testing.assert_allclose(reloaded(x, t, ctx).sample.numpy(), ref.numpy(), atol=1e-6, rtol=0)


def test_fpdm_export_round_trip(tmp_path):
  config = dataclasses.replace(TINY_UNET_CONFIG, fpdm=True)
  unet, forward = _torch_fpdm_unet(config, seed=7)
  unet.save_pretrained(tmp_path / "src")
  model = load_unet(tmp_path / "src", class_embed_input_dim=24,
                    pose_embedding_channels=(4, 8, 8, 16))
  export_unet(model, tmp_path / "out")
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["_fpdm_additions"]["pose_embedding_channels"] == [4, 8, 8, 16]
  # Our loader finds the additions and their sizes from the exported config.
  again = load_unet(tmp_path / "out")
  assert again.config == model.config
  for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(k))
  # diffusers loads the SD part (the additions are reported as unused keys)
  # and the additions load into their PyTorch definitions under their prefixes.
  sd = hf_folder.load_state_dict(tmp_path / "out")
  reloaded = TorchUNet.from_pretrained(tmp_path / "out").eval()
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
  pose = ControlNetConditioningEmbedding(32, block_out_channels=(4, 8, 8, 16))
  pose.load_state_dict({k[len("pose_embedding."):]: torch.from_numpy(v)
                        for k, v in sd.items() if k.startswith("pose_embedding.")})
  mlp = unet.class_embedding
  mlp.load_state_dict({k[len("class_embedding."):]: torch.from_numpy(v)
                       for k, v in sd.items() if k.startswith("class_embedding.")})
  assert len([k for k in sd if k.startswith(("pose_embedding.", "class_embedding."))]) == 20


def test_incomplete_or_wrong_folders_give_clear_errors(sd2_folder, tmp_path):
  _, folder = sd2_folder
  with pytest.raises(hf_folder.CheckpointFolderError, match="does not exist"):
    load_unet(tmp_path / "nope")
  with pytest.raises(hf_folder.CheckpointFolderError, match="neither config.json nor unet/"):
    load_unet(tmp_path)
  # A pipeline folder with unet/ resolves to it.
  (tmp_path / "pipe").mkdir()
  (tmp_path / "pipe" / "unet").symlink_to(folder, target_is_directory=True)
  assert load_unet(tmp_path / "pipe").config == load_unet(folder).config
  # Weights missing.
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(hf_folder.CheckpointFolderError, match="no weights"):
    load_unet(tmp_path / "noweights")
  # A tensor missing from the checkpoint.
  sd = hf_folder.load_state_dict(folder)
  del sd["mid_block.attentions.0.proj_out.weight"]
  hf_folder.save_safetensors(sd, tmp_path / "missing", "diffusion_pytorch_model.safetensors",
                             config=json.loads((folder / "config.json").read_text()))
  with pytest.raises(hf_folder.ImportMismatchError, match="mid_block.attentions.0.proj_out.kernel"):
    load_unet(tmp_path / "missing")
  # A different architecture than the config says.
  cfg = json.loads((folder / "config.json").read_text())
  cfg["cross_attention_dim"] = 48
  (tmp_path / "wrongsize").mkdir()
  (tmp_path / "wrongsize" / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "wrongsize" / "diffusion_pytorch_model.safetensors").symlink_to(
      folder / "diffusion_pytorch_model.safetensors")
  with pytest.raises(hf_folder.ImportMismatchError, match="shape mismatches"):
    load_unet(tmp_path / "wrongsize")
  # A VAE folder given as a UNet.
  cfg_vae = {"_class_name": "AutoencoderKL"}
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg_vae))
  with pytest.raises(hf_folder.CheckpointFolderError, match="describes a AutoencoderKL"):
    load_unet(tmp_path / "vae")


def test_unsupported_config_options_are_named():
  cfg = dict(SD21_UNET_DIFFUSERS_CONFIG, class_embed_type="timestep",
             addition_embed_type="text_time")
  with pytest.raises(ValueError, match="class_embed_type='timestep'.*addition_embed_type"):
    UNetConfig.from_diffusers_dict(cfg)
  cfg = dict(SD21_UNET_DIFFUSERS_CONFIG,
             down_block_types=["SimpleCrossAttnDownBlock2D"] * 4)
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_diffusers_dict(cfg)
  assert UNetConfig.from_diffusers_dict(SD21_UNET_DIFFUSERS_CONFIG) == SD21_UNET_CONFIG
  assert SD21_UNET_CONFIG.heads == (5, 10, 20, 20) and SD21_UNET_CONFIG.time_embed_dim == 1280
