"""Stage 1: train the shared CLIP encoder and the Combiner (fusion embedding).

Every step embeds source, target pose and target with ONE encoder call on
the concatenated 3B images, fuses (source, pose) and applies FPDM's
self-learning InfoNCE over the global batch. Evaluation is retrieval on the
test split: does ``f(source, pose)`` find its own target among all targets?
At the end the model is exported as ``workdir/fusion_model/`` (a Hugging
Face CLIP folder plus the Combiner), which stage 2 loads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fpdm_jax import input_pipeline, losses, sharding
from fpdm_jax.importers import clip as clip_importer
from fpdm_jax.importers import hf_folder
from fpdm_jax.models.clip import CLIPVisionConfig
from fpdm_jax.models.fusion import FusionConfig, FusionModel
from fpdm_jax.trainers import common


def clip_config(model_cfg) -> CLIPVisionConfig:
  if model_cfg.clip_path:
    return clip_importer.config_from_folder(model_cfg.clip_path)
  presets = {"tiny": CLIPVisionConfig.tiny, "vit_l14": CLIPVisionConfig.vit_l14,
             "vit_b16": CLIPVisionConfig.vit_b16}
  if model_cfg.clip_preset not in presets:
    raise ValueError(f"model.clip_preset={model_cfg.clip_preset!r}: one of {sorted(presets)}")
  return presets[model_cfg.clip_preset](**dict(model_cfg.clip_overrides))


def build_fusion_model(model_cfg, *, seed: int) -> FusionModel:
  """A FusionModel; its encoder loaded from ``model.clip_path`` when set."""
  dt = common.dtype(model_cfg.dtype)
  cfg = FusionConfig(clip_config(model_cfg), dropout=model_cfg.combiner_dropout)
  model = FusionModel(cfg, dtype=dt, remat=model_cfg.remat, rngs=nnx.Rngs(seed))
  if model_cfg.clip_path:
    model.encoder = clip_importer.load_clip_vision(model_cfg.clip_path, dtype=dt)
    logging.info("Stage-1 encoder initialised from %s", model_cfg.clip_path)
  return model


def export_fusion_model(model: FusionModel, folder: Path) -> Path:
  """``folder/encoder`` (transformers CLIPVisionModelWithProjection) +
  ``folder/combiner.safetensors`` + ``folder/fusion_config.json``."""
  folder.mkdir(parents=True, exist_ok=True)
  clip_importer.export_clip_vision(model.encoder, folder / "encoder")
  hf_folder.save_safetensors(hf_folder.export_params(model.combiner), folder,
                             "combiner.safetensors")
  (folder / "fusion_config.json").write_text(json.dumps(
      {"dropout": model.config.dropout, "embed_dim": model.config.clip.projection_dim}))
  return folder


def load_fusion_model(folder: str | Path, *, dtype=jnp.float32) -> FusionModel:
  """The inverse of ``export_fusion_model`` (what stage 2 and evaluation load)."""
  folder = Path(folder)
  if not (folder / "combiner.safetensors").is_file():
    raise hf_folder.CheckpointFolderError(
        f"{folder} is not a stage-1 export (no combiner.safetensors): point "
        "fusion.path at <stage-1 workdir>/fusion_model, written when stage 1 finishes")
  meta = json.loads((folder / "fusion_config.json").read_text())
  encoder = clip_importer.load_clip_vision(folder / "encoder", dtype=dtype)
  cfg = FusionConfig(clip_importer.config_from_folder(folder / "encoder"),
                     dropout=meta["dropout"])
  model = nnx.eval_shape(lambda: FusionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  model.encoder = encoder
  # eval_shape left the combiner abstract: give it arrays, then the weights.
  model.combiner = FusionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)).combiner
  hf_folder.assign_params(model.combiner, hf_folder.load_weight_file(
      folder / "combiner.safetensors"), source=str(folder / "combiner.safetensors"))
  return model


def fusion_views(size: int) -> dict:
  return {"source_clip": ("source_image", (size, size), "clip"),
          "pose_clip": ("target_pose_image", (size, size), "clip"),
          "target_clip": ("target_image", (size, size), "clip")}


class FusionStage:
  """What the shared loop needs to train stage 1."""

  def __init__(self, config, mesh, model: FusionModel | None = None):
    """``model``: the network to train, when already built (``fpdm_jax.plan``
    passes an abstract one)."""
    self.config, self.mesh = config, mesh
    self.trainable = model if model is not None else build_fusion_model(config.model,
                                                                         seed=config.seed)
    self.views = fusion_views(self.trainable.config.clip.image_size)
    self._eval_fn = None

  def frozen_params(self):
    return {}

  def loss_fn(self, model: FusionModel, frozen, batch, rng):
    del frozen
    batch = input_pipeline.normalise(batch, self.views)
    b = batch["source_clip"].shape[0]
    e = model.embed(jnp.concatenate([batch["source_clip"], batch["pose_clip"],
                                     batch["target_clip"]], 0))
    s, p, t = e[:b], e[b:2 * b], e[2 * b:]
    f = model.combiner(s, p, deterministic=False, rngs=rng)
    lc = self.config.loss
    return losses.fusion_infonce_loss(t, s, f, temperature=lc.temperature,
                                      l1_weight=lc.l1_weight)

  def _params_for_eval(self, state):
    return state["ema"] if state["ema"] is not None else state["params"]

  def evaluate(self, state, frozen, model_def) -> dict:
    """Retrieval over the whole test split (or eval.max_batches of it)."""
    from fpdm_jax.trainers.loop import make_loader
    if self._eval_fn is None:
      def embed(params, batch):
        model = model_def(params)
        batch = input_pipeline.normalise(batch, self.views)
        f = model(batch["source_clip"], batch["pose_clip"])
        return f, model.embed(batch["target_clip"])
      self._eval_fn = jax.jit(embed)
    params = self._params_for_eval(state)
    fs, ts = [], []
    d = self.config.data
    loader = make_loader(self.config, self.views, d.eval_split, train=False)
    num_records = len(input_pipeline.open_source(d.data_dir, d.name, d.eval_split))
    for i, local in enumerate(loader):
      if self.config.eval.max_batches and i >= self.config.eval.max_batches:
        break
      # Every process holds full batches (the loader pads the last one); the
      # outputs are gathered whole on every process, then the padding cut.
      n = input_pipeline.valid_rows(num_records, self.config.eval.batch_size, i)
      local = _pad_batch(local, self.config.eval.batch_size // jax.process_count())
      f, t = sharding.to_host(self._eval_fn(params, sharding.global_batch(local, self.mesh)))
      fs.append(f[:n])
      ts.append(t[:n])
    f, t = np.concatenate(fs), np.concatenate(ts)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    m = losses.retrieval_metrics(jnp.asarray(f @ t.T))
    out = {k: float(v) for k, v in m.items()}
    out["num_pairs"] = float(len(f))
    return out

  def report_images(self, state, frozen, model_def, step):
    return {}

  def export(self, state, model_def, workdir: Path) -> None:
    model = model_def(sharding.to_host(self._params_for_eval(state)))
    if jax.process_index() == 0:
      export_fusion_model(model, Path(workdir) / "fusion_model")
      logging.info("Exported the fusion model to %s", Path(workdir) / "fusion_model")


def _pad_batch(batch: dict, size: int) -> dict:
  """Pads the last, short eval batch to the compiled batch size."""
  n = next(iter(batch.values())).shape[0]
  if n == size:
    return batch
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, 0)]) for k, v in batch.items()}
