"""Noise schedules for training and sampling (DDPM, DDIM, DPM-Solver++ 2M).

Numerically these follow diffusers' PyTorch ``DDPMScheduler``,
``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` built from the same
``scheduler_config.json`` (tests/test_schedulers.py checks timesteps, every
sampling step, ``add_noise`` and ``get_velocity`` against them). Unlike
diffusers nothing here holds Python state: a sampler is a pytree of
precomputed per-step arrays plus a small carried state, so the whole loop can
be one ``jax.lax.fori_loop`` with a traced step index.

Configuration
-------------
``SchedulerConfig.from_diffusers_dict(json.load(f))`` reads a diffusers
scheduler config (any of the three classes; ``_class_name`` and
``_diffusers_version`` are ignored, as are keys that do not change these
schedulers, e.g. PNDM's ``skip_prk_steps``). Options we do not implement raise
``ValueError`` naming the key when set to anything but their neutral value
(``thresholding``, ``rescale_betas_zero_snr``, Karras/exponential/beta/flow
sigmas, SDE or non-"++" DPM-Solver, learned variances, ...). ``SD21_SCHEDULER``
is Stable Diffusion 2.1's config (v-prediction).

Note ``timestep_spacing`` defaults to ``"leading"`` (DDIM/DDPM's default, and
what an SD 2.1 pipeline's config carries); diffusers' DPM-Solver class
defaults to ``"linspace"`` when the key is absent from the JSON.

Training (pure, jit-friendly; ``t`` is an int array of shape ``[B]`` and the
batch is the leading axis of ``x0`` -- any layout after it)::

  table = alphas_cumprod(cfg)                  # np.float32 [num_train_timesteps]
  x_t = add_noise(cfg_or_table, x0, noise, t)  # sqrt(a) x0 + sqrt(1-a) noise
  y = training_target(cfg, x0, noise, t)       # noise | v | x0 per prediction_type
  v = get_velocity(cfg_or_table, x0, noise, t) # sqrt(a) noise - sqrt(1-a) x0
  w = min_snr_weight(cfg, t, gamma=5.0)        # per-example loss weight [B]
  s = snr(cfg_or_table, t)                     # a / (1 - a)

Sampling::

  sched = make_sampler_schedule("ddim", cfg, 20)          # or "ddpm", "dpmsolver++"
  state = init_state(sched, x_T)
  def body(i, carry):
    x, state = carry
    t = sched.timesteps[i]                                # int32, traced
    eps = model(x, t)                                     # whatever cfg.prediction_type says
    x, state = sampler_step(sched, state, i, eps, x, jax.random.fold_in(key, i))
    return x, state
  x0, _ = jax.lax.fori_loop(0, sched.num_steps, body, (x_T, state))

``Schedule`` is a registered dataclass pytree: its arrays (``timesteps`` and
per-step coefficients, float32, indexed by ``i``) are leaves; ``kind``,
``num_steps``, ``prediction_type``, clipping and ``stochastic`` are static
metadata, so passing a schedule into ``jax.jit`` retraces only when those
change. ``sampler_step(schedule, state, i, model_output, sample, key=None,
noise=None) -> (prev_sample, state)``: the step index ``i`` may be a traced
int; nothing branches on traced values. A stochastic step (DDPM; DDIM with
``eta > 0``) needs either ``key`` (``noise = jax.random.normal(key,
sample.shape, sample.dtype)``) or explicit ``noise``; deterministic steps
ignore both. ``init_state`` gives ``()`` for DDPM/DDIM and ``DPMState`` (the
previous step's x0 prediction and whether there is one) for DPM-Solver++.
``timesteps(kind, cfg, n)`` returns exactly diffusers' ``set_timesteps``
(np.int64); ``ddpm_timesteps``/``ddim_timesteps``/``dpm_timesteps`` are the
individual functions. ``x_T`` is plain ``N(0, 1)`` noise for all three
(``init_noise_sigma == 1``); no input scaling is needed.

Faithfully reproduced diffusers details: DDIM's previous timestep is
``t - num_train_timesteps // num_steps`` whatever the spacing (so with
"trailing"/"linspace" it is not always the next listed timestep), with
``set_alpha_to_one`` deciding the alpha past the end; DDPM's previous
timestep is the next listed one (alpha 1 past the end) and it adds noise at
every step whose ``t > 0`` (with SD's ``steps_offset = 1`` that includes the
last); DPM-Solver++ is first order on its first step and on the last
(``final_sigmas_type="zero"``, or ``lower_order_final`` with fewer than 15
steps), and its sigmas are interpolated from the training table.

``alphas_cumprod`` is diffusers' float32 table bit for bit (torch's float32
``linspace`` and its double-accumulated ``cumprod`` are reproduced); the
per-step coefficients are derived from it in float64 and stored as float32.
(The original CompVis SD code built the table in float64; the two differ by
< 3e-7.)
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SchedulerConfig", "SD21_SCHEDULER", "SAMPLERS",
    "betas", "alphas_cumprod", "add_noise", "get_velocity", "training_target",
    "snr", "min_snr_weight",
    "ddpm_timesteps", "ddim_timesteps", "dpm_timesteps", "timesteps",
    "Schedule", "DPMState", "make_sampler_schedule", "init_state", "sampler_step",
]

_log = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
_KIND_ALIASES = {"ddpm": "ddpm", "ddim": "ddim", "dpmsolver++": "dpmsolver++",
                 "dpm": "dpmsolver++", "dpmsolver": "dpmsolver++",
                 "dpm++": "dpmsolver++", "dpmsolver++2m": "dpmsolver++"}


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The diffusers scheduler options we honour (defaults as DDIM/DDPM's)."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"        # linear | scaled_linear | squaredcos_cap_v2
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"     # epsilon | v_prediction | sample
  timestep_spacing: str = "leading"    # leading | trailing | linspace
  steps_offset: int = 0
  clip_sample: bool = True             # DDPM / DDIM only, as in diffusers
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True        # DDIM only
  variance_type: str = "fixed_small"   # DDPM: fixed_small | fixed_small_log | fixed_large
  thresholding: bool = False           # only False is supported
  rescale_betas_zero_snr: bool = False  # only False is supported
  # DPM-Solver++ (multistep) options, diffusers' defaults.
  solver_order: int = 2                # 1 or 2
  solver_type: str = "midpoint"        # midpoint | heun
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"      # zero | sigma_min
  lambda_min_clipped: float = -math.inf

  def __post_init__(self):
    def check(name, allowed):
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(f"scheduler config: {name}={value!r} is not supported "
                         f"(supported: {', '.join(map(repr, allowed))})")
    if self.trained_betas is None:
      check("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
    else:
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(f"scheduler config: trained_betas has {len(self.trained_betas)} "
                         f"values, num_train_timesteps is {self.num_train_timesteps}")
    check("prediction_type", ("epsilon", "v_prediction", "sample"))
    check("timestep_spacing", ("leading", "trailing", "linspace"))
    check("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))
    check("thresholding", (False,))
    check("rescale_betas_zero_snr", (False,))
    check("solver_order", (1, 2))
    check("solver_type", ("midpoint", "heun"))
    check("final_sigmas_type", ("zero", "sigma_min"))
    if self.num_train_timesteps < 2:
      raise ValueError("scheduler config: num_train_timesteps must be >= 2")

  # Keys that we read / that never matter / that must hold a neutral value.
  _IGNORED = frozenset({
      "_class_name", "_diffusers_version", "_use_default_values",
      "skip_prk_steps",  # PNDM (SD's original scheduler) only
      "dynamic_thresholding_ratio", "sample_max_value",  # only with thresholding
      "flow_shift", "time_shift_type",  # only with flow sigmas / dynamic shifting
  })
  _NEUTRAL = {
      "algorithm_type": ("dpmsolver++", "deis"),  # diffusers maps deis -> dpmsolver++
      "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None),
      "use_beta_sigmas": (False, None), "use_lu_lambdas": (False, None),
      "use_flow_sigmas": (False, None), "use_dynamic_shifting": (False, None),
      "thresholding": (False,), "rescale_betas_zero_snr": (False,),
  }

  @classmethod
  def from_diffusers_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
    """Builds a config from a diffusers ``scheduler_config.json`` dict.

    Unknown keys are ignored (logged at debug level); known options we cannot
    honour raise ``ValueError`` unless they hold their neutral value.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
      if key in cls._IGNORED:
        continue
      if key in cls._NEUTRAL:
        if value not in cls._NEUTRAL[key]:
          raise ValueError(f"scheduler config: {key}={value!r} is not supported "
                           f"(only {cls._NEUTRAL[key][0]!r})")
        if key not in fields:
          continue
      if key == "variance_type" and value is None:  # DPM-Solver's default
        continue
      if key == "solver_type" and value in ("logrho", "bh1", "bh2"):
        value = "midpoint"  # diffusers does the same for UniPC/DEIS configs
      if key in fields:
        kwargs[key] = value
      else:
        _log.debug("scheduler config: ignoring %s=%r", key, value)
    if kwargs.get("lambda_min_clipped") is None:
      kwargs.pop("lambda_min_clipped", None)
    return cls(**kwargs)


# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json,
# a DDIMScheduler config; the timestep spacing is DDIM's default).
SD21_SCHEDULER = SchedulerConfig(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="v_prediction",
    timestep_spacing="leading", steps_offset=1, clip_sample=False,
    set_alpha_to_one=False)


# --------------------------------------------------------------------------
# Training-side tables and functions
# --------------------------------------------------------------------------

def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit on CPU.

  torch takes a float32 step and fills the first half from ``start`` and the
  second half from ``end`` with double-precision arithmetic.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  lo = np.float64(start32) + np.float64(step) * i
  hi = np.float64(end32) - np.float64(step) * (n - 1 - i)
  return np.where(np.arange(n) < n // 2, lo, hi).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _betas32(cfg: SchedulerConfig) -> np.ndarray:
  n = cfg.num_train_timesteps
  if cfg.trained_betas is not None:
    out = np.asarray(cfg.trained_betas, np.float32)
  elif cfg.beta_schedule == "linear":
    out = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
  elif cfg.beta_schedule == "scaled_linear":
    lin = _torch_linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n)
    out = lin * lin
  else:  # squaredcos_cap_v2: diffusers' betas_for_alpha_bar (cosine, max_beta 0.999)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    out = np.asarray([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=32)
def _alphas_cumprod64(cfg: SchedulerConfig) -> np.ndarray:
  """diffusers' float32 table (torch's cumprod accumulates in double), as float64."""
  alphas = np.float32(1.0) - _betas32(cfg)
  out = np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)
  out.setflags(write=False)
  return out


def betas(cfg: SchedulerConfig) -> np.ndarray:
  """The training betas, float32 ``[num_train_timesteps]``."""
  return _betas32(cfg).copy()


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """``prod_{s<=t} (1 - beta_s)`` as float32 ``[num_train_timesteps]``."""
  return _alphas_cumprod64(cfg).astype(np.float32)


def _table(cfg_or_table) -> jax.Array:
  if isinstance(cfg_or_table, SchedulerConfig):
    return jnp.asarray(alphas_cumprod(cfg_or_table))
  return jnp.asarray(cfg_or_table)


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against ``like`` (batch leading)."""
  values = jnp.reshape(values, (-1,))
  return jnp.reshape(values, values.shape + (1,) * (like.ndim - 1)).astype(like.dtype)


def _sqrt_alphas(cfg_or_table, t, like):
  a = _table(cfg_or_table)[jnp.asarray(t)]
  return _per_example(jnp.sqrt(a), like), _per_example(jnp.sqrt(1.0 - a), like)


def add_noise(cfg_or_table, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (t: int ``[B]``)."""
  sa, s1a = _sqrt_alphas(cfg_or_table, t, x0)
  return sa * x0 + s1a * noise


def get_velocity(cfg_or_table, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v target ``sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
  sa, s1a = _sqrt_alphas(cfg_or_table, t, x0)
  return sa * noise - s1a * x0


def training_target(cfg: SchedulerConfig, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
  """What the model regresses onto, by ``cfg.prediction_type``."""
  if cfg.prediction_type == "epsilon":
    return noise
  if cfg.prediction_type == "v_prediction":
    return get_velocity(cfg, x0, noise, t)
  return x0


def snr(cfg_or_table, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ``a_t / (1 - a_t)`` per timestep, float32."""
  a = _table(cfg_or_table)[jnp.asarray(t)]
  return a / (1.0 - a)


def min_snr_weight(cfg: SchedulerConfig, t: jax.Array, gamma: float = 5.0) -> jax.Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023) as in diffusers' examples.

  ``min(snr, gamma)`` divided by ``snr`` for epsilon targets, by ``snr + 1``
  for v targets, undivided for x0 targets. Multiply the per-example MSE
  (mean over non-batch axes) by it before averaging over the batch.
  """
  s = snr(cfg, t)
  w = jnp.minimum(s, gamma)
  if cfg.prediction_type == "epsilon":
    return w / s
  if cfg.prediction_type == "v_prediction":
    return w / (s + 1.0)
  return w


# --------------------------------------------------------------------------
# Inference timesteps (exactly diffusers' set_timesteps)
# --------------------------------------------------------------------------

def _check_steps(cfg: SchedulerConfig, n: int):
  if not 1 <= n <= cfg.num_train_timesteps:
    raise ValueError(f"num_inference_steps={n} must be in [1, {cfg.num_train_timesteps}]")


def ddim_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """DDIMScheduler.set_timesteps (DDPMScheduler's is the same)."""
  n, T = int(num_inference_steps), cfg.num_train_timesteps
  _check_steps(cfg, n)
  if cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
  elif cfg.timestep_spacing == "leading":
    ratio = T // n
    ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
    ts += cfg.steps_offset
  else:  # trailing
    ratio = T / n
    ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
    ts -= 1
  return ts


ddpm_timesteps = ddim_timesteps


def _lambda_table(cfg: SchedulerConfig) -> np.ndarray:
  ac = _alphas_cumprod64(cfg)
  return np.log(np.sqrt(ac)) - np.log(np.sqrt(1.0 - ac))


def dpm_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """DPMSolverMultistepScheduler.set_timesteps (no Karras/Lu/... sigmas)."""
  n, T = int(num_inference_steps), cfg.num_train_timesteps
  _check_steps(cfg, n)
  clipped_idx = int(np.searchsorted(_lambda_table(cfg)[::-1], cfg.lambda_min_clipped,
                                    side="left"))
  last = T - clipped_idx
  if cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
  elif cfg.timestep_spacing == "leading":
    ratio = last // (n + 1)
    ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
    ts += cfg.steps_offset
  else:  # trailing
    ratio = T / n
    ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64)
    ts -= 1
  return ts


def _kind(kind: str) -> str:
  try:
    return _KIND_ALIASES[kind.lower()]
  except KeyError:
    raise ValueError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}") from None


def timesteps(kind: str, cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """The sampler's timesteps, int64, identical to diffusers' ``set_timesteps``."""
  kind = _kind(kind)
  if kind == "dpmsolver++":
    return dpm_timesteps(cfg, num_inference_steps)
  return ddim_timesteps(cfg, num_inference_steps)


# --------------------------------------------------------------------------
# Sampling schedules and steps
# --------------------------------------------------------------------------

_ARRAY_FIELDS = ("timesteps", "sqrt_alpha", "sqrt_one_minus_alpha", "coef_x0",
                 "coef_eps", "coef_sample", "coef_d1", "noise_std", "second_order")
_META_FIELDS = ("kind", "num_steps", "prediction_type", "clip_sample",
                "clip_sample_range", "stochastic")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=list(_ARRAY_FIELDS), meta_fields=list(_META_FIELDS))
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-step arrays (leading axis = step index ``i``) and static metadata.

  For step ``i`` with model input ``x`` at ``timesteps[i]``:
  ``x0 = sqrt_alpha * x - sqrt_one_minus_alpha * v`` (or the epsilon /
  sample equivalents), then

  * DDPM: ``coef_x0 * x0 + coef_sample * x + noise_std * z``
  * DDIM: ``coef_x0 * x0 + coef_eps * eps + noise_std * z``
  * DPM-Solver++: ``coef_sample * x + coef_x0 * x0 + coef_d1 * (x0 - prev_x0)``
    where ``coef_d1`` applies only when ``second_order`` and a previous x0
    exists.

  Unused coefficient arrays are zeros.
  """
  timesteps: jax.Array              # int32 [n]: the model's t at step i
  sqrt_alpha: jax.Array             # float32 [n]
  sqrt_one_minus_alpha: jax.Array   # float32 [n]
  coef_x0: jax.Array
  coef_eps: jax.Array
  coef_sample: jax.Array
  coef_d1: jax.Array
  noise_std: jax.Array
  second_order: jax.Array           # bool [n]
  kind: str = "ddim"
  num_steps: int = 0
  prediction_type: str = "epsilon"
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  stochastic: bool = False


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prev_x0", "has_prev"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DPMState:
  """DPM-Solver++ multistep memory: the previous step's x0 prediction."""
  prev_x0: jax.Array
  has_prev: jax.Array  # bool scalar


def _ddpm_tables(cfg: SchedulerConfig, ts: np.ndarray) -> dict:
  ac = _alphas_cumprod64(cfg)
  n = len(ts)
  a_t = ac[ts]
  a_prev = np.array([ac[ts[i + 1]] if i + 1 < n else 1.0 for i in range(n)])
  b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
  cur_alpha = a_t / a_prev
  cur_beta = 1.0 - cur_alpha
  variance = np.maximum(b_prev / b_t * cur_beta, 1e-20)
  if cfg.variance_type == "fixed_large":
    variance = cur_beta
  std = np.where(ts > 0, np.sqrt(variance), 0.0)
  return dict(sqrt_alpha=np.sqrt(a_t), sqrt_one_minus_alpha=np.sqrt(b_t),
              coef_x0=np.sqrt(a_prev) * cur_beta / b_t,
              coef_sample=np.sqrt(cur_alpha) * b_prev / b_t, noise_std=std)


def _ddim_tables(cfg: SchedulerConfig, ts: np.ndarray, eta: float) -> dict:
  ac = _alphas_cumprod64(cfg)
  n = len(ts)
  final = 1.0 if cfg.set_alpha_to_one else ac[0]
  prev = ts - cfg.num_train_timesteps // n
  a_t = ac[ts]
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
  b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
  variance = b_prev / b_t * (1.0 - a_t / a_prev)
  std = eta * np.sqrt(variance)
  return dict(sqrt_alpha=np.sqrt(a_t), sqrt_one_minus_alpha=np.sqrt(b_t),
              coef_x0=np.sqrt(a_prev), coef_eps=np.sqrt(1.0 - a_prev - std ** 2),
              noise_std=std)


def _dpm_tables(cfg: SchedulerConfig, ts: np.ndarray) -> dict:
  ac = _alphas_cumprod64(cfg)
  n = len(ts)
  all_sigmas = np.sqrt((1.0 - ac) / ac)
  sig = all_sigmas[ts]
  last = all_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
  sig = np.concatenate([sig, [last]])
  alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)          # diffusers' _sigma_to_alpha_sigma_t
  sigma = sig * alpha
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.log(alpha) - np.log(sigma)           # +inf at a zero final sigma
    h = lam[1:] - lam[:-1]                        # step i: s0 = i -> t = i + 1
    expm = np.exp(-h) - 1.0
    coef_sample = sigma[1:] / sigma[:-1]
    coef_x0 = -alpha[1:] * expm
    h0 = np.concatenate([[np.nan], h[:-1]])       # lambda_s0 - lambda_s1
    inv_r0 = h / h0
    if cfg.solver_type == "midpoint":
      coef_d1 = -0.5 * alpha[1:] * expm * inv_r0
    else:  # heun
      coef_d1 = alpha[1:] * (expm / h + 1.0) * inv_r0
  second = np.full(n, cfg.solver_order == 2)
  second[0] = False
  final_low = (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
               or cfg.final_sigmas_type == "zero")
  if final_low:
    second[-1] = False
  coef_d1 = np.where(second, coef_d1, 0.0)
  return dict(sqrt_alpha=alpha[:-1], sqrt_one_minus_alpha=sigma[:-1], coef_x0=coef_x0,
              coef_sample=coef_sample, coef_d1=coef_d1, second_order=second)


def make_sampler_schedule(kind: str, cfg: SchedulerConfig, num_steps: int, *,
                          eta: float = 0.0) -> Schedule:
  """Precomputes a sampler's per-step arrays.

  ``kind``: "ddpm", "ddim" or "dpmsolver++" (DPM-Solver++ multistep, order
  ``cfg.solver_order``). ``eta`` is DDIM's noise weight (0: deterministic).
  """
  kind = _kind(kind)
  ts = timesteps(kind, cfg, num_steps)
  n = len(ts)
  if kind == "ddpm":
    tables, stochastic = _ddpm_tables(cfg, ts), True
  elif kind == "ddim":
    if eta < 0:
      raise ValueError(f"eta must be >= 0, got {eta}")
    tables, stochastic = _ddim_tables(cfg, ts, float(eta)), eta > 0
  else:
    tables, stochastic = _dpm_tables(cfg, ts), False
  arrays = {}
  for name in _ARRAY_FIELDS[1:]:
    value = tables.get(name)
    if name == "second_order":
      arrays[name] = jnp.asarray(np.zeros(n, bool) if value is None else value)
    else:
      arrays[name] = jnp.asarray(np.zeros(n) if value is None else value, jnp.float32)
  clip = cfg.clip_sample and kind != "dpmsolver++"
  return Schedule(timesteps=jnp.asarray(ts, jnp.int32), **arrays, kind=kind, num_steps=n,
                  prediction_type=cfg.prediction_type, clip_sample=bool(clip),
                  clip_sample_range=float(cfg.clip_sample_range),
                  stochastic=bool(stochastic))


def init_state(schedule: Schedule, sample: jax.Array):
  """The carried sampler state for a loop starting at any step index."""
  if schedule.kind == "dpmsolver++":
    return DPMState(prev_x0=jnp.zeros_like(sample), has_prev=jnp.asarray(False))
  return ()


def _predict(schedule: Schedule, i, model_output, sample, need_eps: bool):
  """(x0, eps) predictions from the model output at step ``i``."""
  sa = schedule.sqrt_alpha[i].astype(sample.dtype)
  s1a = schedule.sqrt_one_minus_alpha[i].astype(sample.dtype)
  eps = None
  if schedule.prediction_type == "epsilon":
    x0 = (sample - s1a * model_output) / sa
    eps = model_output
  elif schedule.prediction_type == "sample":
    x0 = model_output
    if need_eps:
      eps = (sample - sa * x0) / s1a
  else:  # v_prediction
    x0 = sa * sample - s1a * model_output
    if need_eps:
      eps = sa * model_output + s1a * sample
  return x0, eps


def sampler_step(schedule: Schedule, state, i, model_output: jax.Array, sample: jax.Array,
                 key: jax.Array | None = None, noise: jax.Array | None = None):
  """One denoising step ``x_{t_i} -> x_{t_{i+1}}``; returns ``(prev_sample, state)``.

  ``i`` may be traced. ``key`` or ``noise`` is needed only when
  ``schedule.stochastic`` (DDPM; DDIM with eta > 0).
  """
  dtype = sample.dtype
  model_output = model_output.astype(dtype)
  c = lambda name: getattr(schedule, name)[i].astype(dtype)
  if schedule.kind == "dpmsolver++":
    x0, _ = _predict(schedule, i, model_output, sample, need_eps=False)
    use_d1 = jnp.logical_and(schedule.second_order[i], state.has_prev)
    d1 = jnp.where(use_d1, c("coef_d1"), jnp.zeros((), dtype))
    prev = c("coef_sample") * sample + c("coef_x0") * x0 + d1 * (x0 - state.prev_x0)
    return prev, DPMState(prev_x0=x0, has_prev=jnp.asarray(True))

  x0, eps = _predict(schedule, i, model_output, sample, need_eps=schedule.kind == "ddim")
  if schedule.clip_sample:
    # As diffusers: eps (DDIM) stays the one derived from the unclipped x0.
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  if schedule.kind == "ddpm":
    prev = c("coef_x0") * x0 + c("coef_sample") * sample
  else:
    prev = c("coef_x0") * x0 + c("coef_eps") * eps
  if schedule.stochastic:
    if noise is None:
      if key is None:
        raise ValueError(f"a stochastic {schedule.kind} step needs `key` or `noise`")
      noise = jax.random.normal(key, sample.shape, dtype)
    prev = prev + c("noise_std") * noise.astype(dtype)
  return prev, state
