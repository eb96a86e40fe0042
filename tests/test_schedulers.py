"""Schedulers vs diffusers' PyTorch DDPM / DDIM / DPM-Solver++ multistep.

Every comparison builds the diffusers scheduler from the same config. The
"model" is a fixed deterministic function of the sample and the timestep,
``0.1 * x + sin(t) * fixed_noise``, evaluated on each side's own trajectory,
so every step's output is compared after the errors of all earlier steps.
Stochastic steps get identical noise: DDIM through its ``variance_noise``
argument, DDPM by replacing ``randn_tensor`` in diffusers' DDPM module with a
function that hands out our pre-drawn noise tensors in order.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from fpdm_jax import schedulers as S  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SPACINGS = ("leading", "trailing", "linspace")

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD21_JSON = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}

_TORCH_CLASSES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
}


def _torch_scheduler(kind, cfg):
  d = dataclasses.asdict(cfg)
  d["trained_betas"] = None if cfg.trained_betas is None else list(cfg.trained_betas)
  if kind != "ddpm":
    d.pop("variance_type")
  if kind == "dpmsolver++":
    d["algorithm_type"] = "dpmsolver++"
  # from_config drops the keys a class does not take (as loading a pipeline does).
  return _TORCH_CLASSES[kind].from_config(d)


def _fixed(seed, n=1, shape=SHAPE):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n,) + shape).astype(np.float32)


def _model(x, t, fixed, coefs=(0.1, 1.0)):
  """The same deterministic "model output" for numpy/JAX and torch arrays."""
  a, b = coefs
  return a * x + b * float(np.float32(math.sin(float(t)))) * fixed


def _coefs(prediction_type):
  """``0.1 x + sin(t) z`` keeps v / x0 trajectories O(1). As an epsilon it says
  x0 = (0.9 x - ...) / sqrt(alpha_t): samples grow to |x| ~ 35, where float32's
  spacing is 4e-6, so the epsilon runs use ``0.9 x + 0.1 sin(t) z`` (near what
  a denoiser predicts at high noise); the wild variant is checked relatively."""
  return (0.9, 0.1) if prediction_type == "epsilon" else (0.1, 1.0)


# ------------------------------------------------------------------ config


def test_sd21_config_from_json():
  cfg = S.SchedulerConfig.from_diffusers_dict(SD21_JSON)
  assert cfg == S.SD21_SCHEDULER
  assert S.SchedulerConfig.from_diffusers_dict(
      dict(SD21_JSON, some_future_key=3)) == S.SD21_SCHEDULER
  # A full diffusers config dict (every default written out) reads back the same.
  for kind in ("ddpm", "ddim", "dpmsolver++"):
    full = dict(_torch_scheduler(kind, cfg).config)
    assert S.SchedulerConfig.from_diffusers_dict(full) == cfg, kind


@pytest.mark.parametrize("key,value", [
    ("thresholding", True), ("rescale_betas_zero_snr", True),
    ("use_karras_sigmas", True), ("algorithm_type", "sde-dpmsolver++"),
    ("variance_type", "learned_range"), ("beta_schedule", "sigmoid"),
    ("prediction_type", "flow_prediction"), ("timestep_spacing", "karras"),
])
def test_config_rejects_what_we_cannot_honour(key, value):
  with pytest.raises(ValueError, match=key):
    S.SchedulerConfig.from_diffusers_dict(dict(SD21_JSON, **{key: value}))


# --------------------------------------------------------------- timesteps


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver++"])
def test_timesteps_match_diffusers(kind):
  for spacing in SPACINGS:
    for offset in (0, 1):
      cfg = dataclasses.replace(S.SD21_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
      ref = _torch_scheduler(kind, cfg)
      for n in (1, 7, 20, 25, 50, 999):
        ref.set_timesteps(n)
        ours = S.timesteps(kind, cfg, n)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{spacing} {offset} {n}")
        if n in (20, 50):
          sched = S.make_sampler_schedule(kind, cfg, n)
          np.testing.assert_array_equal(np.asarray(sched.timesteps), ours)
          assert sched.num_steps == n


def test_alphas_cumprod_matches_diffusers():
  for cfg in (S.SD21_SCHEDULER, S.SchedulerConfig(),
              S.SchedulerConfig(beta_schedule="squaredcos_cap_v2")):
    ref = diffusers.DDPMScheduler(**{k: getattr(cfg, k) for k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    # Bit for bit: torch's float32 linspace and double-accumulated cumprod.
    np.testing.assert_array_equal(S.betas(cfg), ref.betas.numpy())
    np.testing.assert_array_equal(S.alphas_cumprod(cfg), ref.alphas_cumprod.numpy())


# ------------------------------------------------------------ full loops

_LOOP_CASES = [
    # (kind, config overrides, eta)
    ("ddim", dict(), 0.0),
    ("ddim", dict(prediction_type="epsilon"), 0.0),
    ("ddim", dict(prediction_type="sample"), 0.0),
    ("ddim", dict(timestep_spacing="trailing", set_alpha_to_one=True), 0.0),
    ("ddim", dict(timestep_spacing="linspace", prediction_type="epsilon"), 0.0),
    ("ddim", dict(), 0.7),
    ("ddim", dict(prediction_type="epsilon", clip_sample=True, clip_sample_range=1.5), 1.0),
    ("ddpm", dict(), None),
    ("ddpm", dict(prediction_type="epsilon"), None),
    ("ddpm", dict(prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing",
                  variance_type="fixed_large"), None),
    ("ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                  timestep_spacing="linspace"), None),
    ("dpmsolver++", dict(), None),
    ("dpmsolver++", dict(prediction_type="epsilon"), None),
    ("dpmsolver++", dict(prediction_type="sample", timestep_spacing="trailing"), None),
    ("dpmsolver++", dict(timestep_spacing="linspace", solver_type="heun"), None),
    ("dpmsolver++", dict(final_sigmas_type="sigma_min", prediction_type="epsilon"), None),
    ("dpmsolver++", dict(solver_order=1), None),
]


def _run_ours(sched, x, fixed, noises, start=0, coefs=(0.1, 1.0)):
  state = S.init_state(sched, jnp.asarray(x))
  x = jnp.asarray(x)
  outs = []
  for i in range(start, sched.num_steps):
    t = int(sched.timesteps[i])
    mo = _model(x, t, jnp.asarray(fixed), coefs)
    noise = None if noises is None else jnp.asarray(noises[i])
    x, state = S.sampler_step(sched, state, i, mo, x, noise=noise)
    outs.append(np.asarray(x))
  return outs


def _run_torch(kind, cfg, n, x, fixed, noises, eta, monkeypatch, start=0, coefs=(0.1, 1.0)):
  ref = _torch_scheduler(kind, cfg)
  ref.set_timesteps(n)
  if start:
    ref.set_begin_index(start)
  x = torch.from_numpy(x.copy())
  fixed_t = torch.from_numpy(fixed)
  outs = []
  for i, t in enumerate(ref.timesteps[start:], start):
    mo = _model(x, int(t), fixed_t, coefs)
    kwargs = {}
    if kind == "ddim":
      kwargs = dict(eta=eta)
      if eta:
        kwargs["variance_noise"] = torch.from_numpy(noises[i])
    elif kind == "ddpm":
      calls = []

      def fake_randn(shape, generator=None, device=None, dtype=None, _i=i, _calls=calls):
        assert tuple(shape) == x.shape and dtype == torch.float32
        _calls.append(_i)
        return torch.from_numpy(noises[_i])
      monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    x = ref.step(mo, t, x, **kwargs).prev_sample
    if kind == "ddpm":
      assert calls == ([i] if int(t) > 0 else [])
    outs.append(x.numpy())
  return outs


@pytest.mark.parametrize("kind,overrides,eta", _LOOP_CASES,
                         ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items()) or 'sd21'}-eta{e}"
                              for k, o, e in _LOOP_CASES])
def test_20_step_loop_matches_diffusers(kind, overrides, eta, monkeypatch):
  cfg = dataclasses.replace(S.SD21_SCHEDULER, **overrides)
  n = 20
  x_T, fixed = _fixed(0)[0], _fixed(1)[0]
  stochastic = kind == "ddpm" or bool(eta)
  noises = _fixed(2, n) if stochastic else None
  sched = S.make_sampler_schedule(kind, cfg, n, **({"eta": eta} if kind == "ddim" else {}))
  assert sched.stochastic == stochastic
  coefs = _coefs(cfg.prediction_type)
  ours = _run_ours(sched, x_T, fixed, noises, coefs=coefs)
  ref = _run_torch(kind, cfg, n, x_T, fixed, noises, eta, monkeypatch, coefs=coefs)
  assert len(ours) == len(ref) == n
  errs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
  print(f"max|ours - diffusers| over {n} steps: {max(errs):.2e} "
        f"(max|x| {max(float(np.abs(b).max()) for b in ref):.1f})")
  assert max(errs) < TOL, (max(errs), errs)
  assert np.isfinite(ours[-1]).all()


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "dpmsolver++"])
def test_wild_epsilon_loop_matches_diffusers_relatively(kind, monkeypatch):
  """Epsilon = 0.1 x + sin(t) z: |x| reaches ~35; agree to a few float32 ulps."""
  cfg = dataclasses.replace(S.SD21_SCHEDULER, prediction_type="epsilon")
  x_T, fixed = _fixed(0)[0], _fixed(1)[0]
  noises = _fixed(2, 20) if kind == "ddpm" else None
  sched = S.make_sampler_schedule(kind, cfg, 20)
  ours = _run_ours(sched, x_T, fixed, noises)
  ref = _run_torch(kind, cfg, 20, x_T, fixed, noises, 0.0, monkeypatch)
  scale = max(float(np.abs(b).max()) for b in ref)
  err = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
  print(f"max|ours - diffusers| {err:.2e}, max|x| {scale:.1f}, relative {err / scale:.1e}")
  assert scale > 10 and err < 2e-6 * scale


def test_dpm_loop_started_midway_matches_diffusers(monkeypatch):
  """A loop from step 5 (img2img-style): first step first order, like diffusers."""
  cfg = S.SD21_SCHEDULER
  x, fixed = _fixed(3)[0], _fixed(4)[0]
  sched = S.make_sampler_schedule("dpmsolver++", cfg, 20)
  ours = _run_ours(sched, x, fixed, None, start=5)
  ref = _run_torch("dpmsolver++", cfg, 20, x, fixed, None, None, monkeypatch, start=5)
  assert max(float(np.abs(a - b).max()) for a, b in zip(ours, ref)) < TOL


# -------------------------------------------------------- training side


@pytest.mark.parametrize("cfg", [S.SD21_SCHEDULER, S.SchedulerConfig(beta_schedule="squaredcos_cap_v2")],
                         ids=["sd21", "cosine"])
def test_add_noise_velocity_targets_match_diffusers(cfg):
  ref = _torch_scheduler("ddpm", cfg)
  t = np.array([0, 1, 250, 500, 998, 999], np.int64)
  x0 = 2.0 * _fixed(5, len(t), (16, 16, 4))  # NHWC here; any layout with batch first
  noise = _fixed(6, len(t), (16, 16, 4))
  tt, x0t, nt = torch.from_numpy(t), torch.from_numpy(x0), torch.from_numpy(noise)
  want_xt = ref.add_noise(x0t, nt, tt).numpy()
  want_v = ref.get_velocity(x0t, nt, tt).numpy()
  for table in (cfg, S.alphas_cumprod(cfg)):
    np.testing.assert_allclose(S.add_noise(table, x0, noise, t), want_xt, rtol=0, atol=TOL)
    np.testing.assert_allclose(S.get_velocity(table, x0, noise, t), want_v, rtol=0, atol=TOL)
  for pred, want in (("epsilon", noise), ("v_prediction", want_v), ("sample", x0)):
    c = dataclasses.replace(cfg, prediction_type=pred)
    got = jax.jit(S.training_target, static_argnums=0)(c, x0, noise, t)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  # Integer timesteps of any int dtype; jit-traced t.
  got = jax.jit(lambda x, n, t: S.add_noise(cfg, x, n, t))(x0, noise, jnp.asarray(t, jnp.int32))
  np.testing.assert_allclose(got, want_xt, rtol=0, atol=TOL)


def test_min_snr_weight_matches_diffusers_examples():
  from diffusers.training_utils import compute_snr
  t = np.arange(0, 1000, 7, dtype=np.int64)
  for pred in ("epsilon", "v_prediction", "sample"):
    cfg = dataclasses.replace(S.SD21_SCHEDULER, prediction_type=pred)
    ref = _torch_scheduler("ddpm", cfg)
    s = compute_snr(ref, torch.from_numpy(t))
    w = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0]
    if pred == "epsilon":
      w = w / s
    elif pred == "v_prediction":
      w = w / (s + 1)
    np.testing.assert_allclose(S.snr(cfg, t), s.numpy(), rtol=2e-5)
    np.testing.assert_allclose(S.min_snr_weight(cfg, t, gamma=5.0), w.numpy(), rtol=2e-5)


# ------------------------------------------------------ jit + fori_loop


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmsolver++", 0.0)])
def test_fori_loop_under_jit_matches_python_loop(kind, eta):
  cfg = S.SD21_SCHEDULER
  fixed = jnp.asarray(_fixed(6)[0])
  x_T = jnp.asarray(_fixed(7)[0])
  key = jax.random.key(0)
  sched = S.make_sampler_schedule(kind, cfg, 20, eta=eta)

  def model(x, t):
    return 0.1 * x + jnp.sin(t.astype(jnp.float32)) * fixed

  @jax.jit
  def sample(sched, x, key):
    def body(i, carry):
      x, state = carry
      mo = model(x, sched.timesteps[i])
      return S.sampler_step(sched, state, i, mo, x, jax.random.fold_in(key, i))
    x, _ = jax.lax.fori_loop(0, sched.num_steps, body, (x, S.init_state(sched, x)))
    return x

  got = sample(sched, x_T, key)
  x, state = x_T, S.init_state(sched, x_T)
  for i in range(sched.num_steps):
    x, state = S.sampler_step(sched, state, i, model(x, sched.timesteps[i]), x,
                              jax.random.fold_in(key, i))
  assert got.shape == x_T.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, x, rtol=0, atol=1e-5)
  if sched.stochastic:  # the key matters
    other = sample(sched, x_T, jax.random.key(1))
    assert float(jnp.abs(other - got).max()) > 1e-3


def test_stochastic_step_needs_key_or_noise():
  sched = S.make_sampler_schedule("ddpm", S.SD21_SCHEDULER, 10)
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="key"):
    S.sampler_step(sched, (), 0, x, x)
  # Deterministic samplers need neither.
  for kind in ("ddim", "dpmsolver++"):
    sched = S.make_sampler_schedule(kind, S.SD21_SCHEDULER, 10)
    y, _ = S.sampler_step(sched, S.init_state(sched, x), 0, x, x)
    assert y.shape == x.shape
