"""Losses as pure functions of arrays (no modules, no state)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalise(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def retrieval_metrics(logits: jax.Array) -> dict[str, jax.Array]:
  """Top-1/top-5 accuracy and mean rank (1 = best) of the diagonal positives."""
  positive = jnp.diagonal(logits)
  rank = 1 + jnp.sum(logits > positive[:, None], axis=1)
  return {"top1": jnp.mean(rank <= 1), "top5": jnp.mean(rank <= 5),
          "mean_rank": jnp.mean(rank.astype(jnp.float32))}


def fusion_infonce_loss(target: jax.Array, source: jax.Array, fusion: jax.Array, *,
                        temperature: float = 0.07, l1_weight: float = 1e-4
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FPDM's "self-learning" InfoNCE over the batch it is given.

  With ``T = [t; s]``, ``F = [f; s]``, ``S = [s; s]`` (2B rows),
  ``C[i, j] = cos(T_i, F_j) / tau`` and
  ``loss = mean_i(logsumexp_j C[i, j] - C[i, i]) + l1_weight * mean|S - F|``.
  The source rows teach the embedding space that a source retrieves itself,
  so ``f`` must move away from ``s`` exactly as far as the pose demands.

  Called under ``jax.jit`` on globally sharded arrays, the batch is the
  global batch: negatives come from every device (XLA inserts the gathers).
  """
  t, s, f = (x.astype(jnp.float32) for x in (target, source, fusion))
  T = jnp.concatenate([t, s], 0)
  F = jnp.concatenate([f, s], 0)
  S = jnp.concatenate([s, s], 0)
  logits = _normalise(T) @ _normalise(F).T / temperature
  contrastive = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))
  l1 = jnp.mean(jnp.abs(S - F))
  metrics = {"contrastive": contrastive, "l1": l1,
             **retrieval_metrics(logits)}
  return contrastive + l1_weight * l1, metrics


def diffusion_mse(prediction: jax.Array, target: jax.Array,
                  weight: jax.Array | None = None) -> jax.Array:
  """Mean squared error per sample, optionally weighted (e.g. min-SNR), averaged."""
  err = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)),
                 axis=tuple(range(1, prediction.ndim)))
  if weight is not None:
    err = err * weight
  return jnp.mean(err)
