"""Parity of the evaluation metrics with their reference implementations.

* SSIM / PSNR against scikit-image (the code behind the published numbers).
* Fréchet distance / FeatureStats against direct float64 SciPy / numpy.
* Inception-v3 and LPIPS against PyTorch modules written here to mirror
  torchvision's ``Inception3`` / ``AlexNet`` and lpips' ``LPIPS`` forward with
  their exact state_dict key names (torchvision cannot be installed beside the
  pinned torch, and lpips imports torchvision). Random weights, with
  non-trivial BatchNorm statistics, go through a real ``.pth`` file and our
  importers, so the key mapping is tested too.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
skimage_metrics = pytest.importorskip("skimage.metrics")
scipy_linalg = pytest.importorskip("scipy.linalg")
ndimage = pytest.importorskip("scipy.ndimage")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fpdm_jax import metrics  # noqa: E402
from fpdm_jax.importers import hf_folder  # noqa: E402
from fpdm_jax.metrics import inception as jinception  # noqa: E402

# ``fpdm_jax.metrics.ssim`` the attribute is the function; the module by name:
jssim = importlib.import_module("fpdm_jax.metrics.ssim")

torch.set_num_threads(2)

SKIMAGE_KW = {
    "uniform51": dict(win_size=51),
    "gaussian": dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
}


# ----------------------------------------------------------------------------
# SSIM / PSNR.

def _image_pair(kind: str, h: int, w: int, seed: int):
  rng = np.random.default_rng(seed)
  if kind == "random":
    x = rng.random((h, w, 3))
    y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1)
  elif kind == "gradient":
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    x = np.stack([xx, yy, 0.5 * (xx + yy)], -1)
    y = np.stack([yy, 1 - xx, xx * yy], -1)
  elif kind == "checkerboard":
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = np.repeat((((yy // 7) + (xx // 5)) % 2)[..., None], 3, -1).astype(np.float64)
    y = np.repeat((((yy // 4) + (xx // 9)) % 2)[..., None], 3, -1) * 0.8 + 0.1
    y = y * rng.uniform(0.7, 1.0, (1, 1, 3))
  elif kind == "blocks":  # a person-like image pair: flat regions with edges at borders
    x = np.full((h, w, 3), 0.9)
    x[h // 5:h - 3, w // 3:2 * w // 3] = rng.random(3)
    x[:4] = 0.0
    y = np.roll(x, (3, -2), axis=(0, 1)) * 0.95
  else:
    raise ValueError(kind)
  return x, y


@pytest.mark.parametrize("variant", ["uniform51", "gaussian"])
@pytest.mark.parametrize("size", [(256, 176), (53, 60)])
def test_ssim_matches_skimage(variant, size):
  kinds = ["random", "gradient", "checkerboard", "blocks"]
  pairs = [_image_pair(k, *size, seed=i) for i, k in enumerate(kinds)]
  x = np.stack([p[0] for p in pairs])
  y = np.stack([p[1] for p in pairs])
  ref = [skimage_metrics.structural_similarity(a, b, channel_axis=-1, data_range=1,
                                               **SKIMAGE_KW[variant]) for a, b in zip(x, y)]
  ours = np.asarray(metrics.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                 variant=variant))
  assert ours.shape == (len(kinds),)
  # The protocol needs 1e-4; float32 skimage itself is ~5e-6 off its float64
  # result here, and so are we (see the notes in fpdm_jax/metrics/ssim.py).
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
  # Identical images give 1.
  np.testing.assert_allclose(np.asarray(metrics.ssim(x[:1], x[:1], variant=variant)), 1.0,
                             atol=1e-5)


def test_ssim_gaussian_small_image_and_window_check():
  x, y = _image_pair("random", 12, 17, seed=5)
  ref = skimage_metrics.structural_similarity(x, y, channel_axis=-1, data_range=1,
                                              **SKIMAGE_KW["gaussian"])
  ours = metrics.ssim(x[None].astype(np.float32), y[None].astype(np.float32), variant="gaussian")
  assert abs(float(ours[0]) - ref) < 1e-4
  with pytest.raises(ValueError, match="exceeds the image extent"):
    metrics.ssim(x[None], y[None], variant="uniform51")
  with pytest.raises(ValueError, match="unknown SSIM variant"):
    metrics.ssim(x[None], y[None], variant="box")


@pytest.mark.parametrize("n", [5, 30, 60])
def test_filter_matrices_reproduce_scipy_reflect(n):
  """The boundary handling on its own, including windows wider than the line
  (scipy reflects repeatedly)."""
  eye = np.eye(n)
  uni = ndimage.uniform_filter1d(eye, size=51, axis=0, mode="reflect")
  np.testing.assert_allclose(jssim.filter_matrix(n, "uniform51"), uni, atol=1e-12)
  gau = ndimage.gaussian_filter1d(eye, sigma=1.5, axis=0, mode="reflect", truncate=3.5)
  np.testing.assert_allclose(jssim.filter_matrix(n, "gaussian"), gau, atol=1e-12)


def test_psnr_matches_skimage():
  pairs = [_image_pair(k, 64, 44, seed=i) for i, k in enumerate(["random", "gradient", "blocks"])]
  x = np.stack([p[0] for p in pairs]).astype(np.float32)
  y = np.stack([p[1] for p in pairs]).astype(np.float32)
  ref = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(x, y)]
  np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# Fréchet distance.

def _reference_fid(mu1, s1, mu2, s2):
  covmean = scipy_linalg.sqrtm(s1 @ s2)
  covmean = covmean[0] if isinstance(covmean, tuple) else covmean
  d = mu1 - mu2
  return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_and_feature_stats():
  rng = np.random.default_rng(0)
  d = 32
  a = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
  b = rng.standard_normal((250, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.7
  stats_a, stats_b = metrics.FeatureStats(), metrics.FeatureStats()
  for chunk in np.array_split(a, 7):  # uneven batches, float32 like device outputs
    stats_a.update(chunk.astype(np.float32))
  for chunk in np.array_split(b, 3):
    stats_b.update(chunk.astype(np.float32))
  a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(stats_a.mean, a32.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats_a.cov, np.cov(a32, rowvar=False), rtol=1e-10, atol=1e-12)
  assert stats_a.count == 300

  ref = _reference_fid(a32.mean(0), np.cov(a32, rowvar=False),
                       b32.mean(0), np.cov(b32, rowvar=False))
  ours = stats_a.frechet_distance(stats_b)
  assert abs(ours - ref) / ref < 1e-6, (ours, ref)
  eig = stats_a.frechet_distance(stats_b, method="eigh")
  assert abs(eig - ref) / ref < 1e-6, (eig, ref)
  assert abs(metrics.frechet_distance(stats_a.mean, stats_a.cov, stats_a.mean, stats_a.cov)) < 1e-6


def test_feature_stats_merge_save_load(tmp_path):
  rng = np.random.default_rng(1)
  f = rng.standard_normal((40, 6))
  whole = metrics.FeatureStats().update(f)
  parts = metrics.FeatureStats().update(f[:13]).merge(metrics.FeatureStats().update(f[13:]))
  np.testing.assert_allclose(parts.cov, whole.cov, atol=1e-12)
  path = whole.save(tmp_path / "ref")
  loaded = metrics.FeatureStats.load(path)
  np.testing.assert_allclose(loaded.cov, whole.cov, atol=1e-14)
  loaded.update(f[:3])  # resumable
  # A pytorch-fid style file: mu/sigma only -> usable for distances, not updates.
  np.savez(tmp_path / "fid.npz", mu=whole.mean, sigma=whole.cov)
  frozen = metrics.FeatureStats.load(tmp_path / "fid.npz")
  np.testing.assert_allclose(frozen.cov, whole.cov, atol=1e-14)
  with pytest.raises(ValueError, match="cannot be updated"):
    frozen.update(f)


def test_frechet_distance_singular_covariances():
  """Fewer samples than dimensions: singular covariances, pytorch-fid's eps path."""
  rng = np.random.default_rng(2)
  a = metrics.FeatureStats().update(rng.standard_normal((5, 20)))
  b = metrics.FeatureStats().update(rng.standard_normal((5, 20)) + 0.5)
  with np.errstate(all="ignore"):
    val = a.frechet_distance(b)
  assert np.isfinite(val)
  assert abs(val - a.frechet_distance(b, method="eigh")) < 1e-3 * abs(val)


# ----------------------------------------------------------------------------
# PyTorch references mirroring torchvision / lpips (names match their state_dicts).

class TBasicConv2d(nn.Module):
  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)), inplace=True)


class TInceptionA(nn.Module):
  def __init__(self, in_channels, pool_features):
    super().__init__()
    self.branch1x1 = TBasicConv2d(in_channels, 64, kernel_size=1)
    self.branch5x5_1 = TBasicConv2d(in_channels, 48, kernel_size=1)
    self.branch5x5_2 = TBasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = TBasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = TBasicConv2d(in_channels, pool_features, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
    return torch.cat([b1, b5, b3, bp], 1)


class TInceptionB(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3 = TBasicConv2d(in_channels, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = TBasicConv2d(in_channels, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionC(nn.Module):
  def __init__(self, in_channels, channels_7x7):
    super().__init__()
    c7 = channels_7x7
    self.branch1x1 = TBasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7_1 = TBasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = TBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TBasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = TBasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
    return torch.cat([b1, b7, bd, bp], 1)


class TInceptionD(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch3x3_1 = TBasicConv2d(in_channels, 192, kernel_size=1)
    self.branch3x3_2 = TBasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = TBasicConv2d(in_channels, 192, kernel_size=1)
    self.branch7x7x3_2 = TBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TBasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionE(nn.Module):
  def __init__(self, in_channels):
    super().__init__()
    self.branch1x1 = TBasicConv2d(in_channels, 320, kernel_size=1)
    self.branch3x3_1 = TBasicConv2d(in_channels, 384, kernel_size=1)
    self.branch3x3_2a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TBasicConv2d(in_channels, 448, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = TBasicConv2d(in_channels, 192, kernel_size=1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
    return torch.cat([b1, b3, bd, bp], 1)


class TInceptionAux(nn.Module):
  def __init__(self, in_channels, num_classes):
    super().__init__()
    self.conv0 = TBasicConv2d(in_channels, 128, kernel_size=1)
    self.conv1 = TBasicConv2d(128, 768, kernel_size=5)
    self.fc = nn.Linear(768, num_classes)


class TInception3(nn.Module):
  """torchvision.models.Inception3 (eval forward; aux head kept for its keys)."""

  def __init__(self, num_classes=1000, transform_input=True):
    super().__init__()
    self.transform_input = transform_input
    self.Conv2d_1a_3x3 = TBasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = TBasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = TBasicConv2d(32, 64, kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = TBasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = TBasicConv2d(80, 192, kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b = TInceptionA(192, pool_features=32)
    self.Mixed_5c = TInceptionA(256, pool_features=64)
    self.Mixed_5d = TInceptionA(288, pool_features=64)
    self.Mixed_6a = TInceptionB(288)
    self.Mixed_6b = TInceptionC(768, channels_7x7=128)
    self.Mixed_6c = TInceptionC(768, channels_7x7=160)
    self.Mixed_6d = TInceptionC(768, channels_7x7=160)
    self.Mixed_6e = TInceptionC(768, channels_7x7=192)
    self.AuxLogits = TInceptionAux(768, num_classes)
    self.Mixed_7a = TInceptionD(768)
    self.Mixed_7b = TInceptionE(1280)
    self.Mixed_7c = TInceptionE(2048)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=0.5)
    self.fc = nn.Linear(2048, num_classes)

  def _transform_input(self, x):
    if self.transform_input:
      x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
      x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
      x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
      x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
    return x

  def pool_features(self, x):
    x = self._transform_input(x)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.maxpool1(x)
    x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
      x = getattr(self, name)(x)
    return torch.flatten(self.dropout(self.avgpool(x)), 1)

  def forward(self, x):
    return self.fc(self.pool_features(x))


def _torch_preprocess(images_nhwc: np.ndarray, antialias=False) -> torch.Tensor:
  """The protocol's torch input pipeline: bilinear to 299, ImageNet mean/std."""
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float()
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False,
                    antialias=antialias)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  return (x - mean) / std


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("shape", [(64, 44), (512, 352), (7, 400)])
def test_resize_matches_torch_interpolate(shape, antialias):
  rng = np.random.default_rng(0)
  x = rng.random((1, *shape, 3)).astype(np.float32)
  out = {(64, 44): (24, 37), (512, 352): (299, 299), (7, 400): (13, 150)}[shape]
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out, mode="bilinear",
                      align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(jinception.resize_bilinear_like_torch(jnp.asarray(x), out, antialias))
  np.testing.assert_allclose(ours, ref, atol=5e-7)


@pytest.mark.parametrize("transform_input", [True, False])
def test_inception_preprocess_matches_torch(transform_input):
  rng = np.random.default_rng(1)
  x = rng.random((2, 48, 33, 3)).astype(np.float32)
  ref = TInception3(transform_input=transform_input)._transform_input(_torch_preprocess(x))
  ours = np.asarray(jinception.preprocess(jnp.asarray(x), transform_input=transform_input))
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def _randomise_batchnorm(model: nn.Module, calibration: torch.Tensor, seed: int):
  """Running stats from a real forward (so activations stay well scaled through
  ~100 layers), then perturbed, and random affine parameters: every BatchNorm
  tensor differs from its default and from its neighbours."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average over the calibration pass
  model.train()
  with torch.no_grad():
    model.pool_features(calibration)
  model.eval()
  with torch.no_grad():
    for bn in bns:
      c = bn.num_features
      bn.running_mean += 0.1 * bn.running_var.sqrt() * torch.randn(c, generator=g)
      bn.running_var *= torch.empty(c).uniform_(0.7, 1.4, generator=g)
      bn.weight.copy_(torch.empty(c).uniform_(0.6, 1.5, generator=g))
      bn.bias.copy_(0.1 * torch.randn(c, generator=g))


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
  torch.manual_seed(0)
  model = TInception3(transform_input=True)
  rng = np.random.default_rng(3)
  _randomise_batchnorm(model, _torch_preprocess(rng.random((2, 80, 60, 3)).astype(np.float32)),
                       seed=1)
  path = tmp_path_factory.mktemp("inception") / "inception_v3_google-test.pth"
  torch.save(model.state_dict(), path)
  return model, path


def test_inception_pool_features_match_torch(torch_inception):
  torch_model, path = torch_inception
  rng = np.random.default_rng(4)
  noise = rng.random((64, 44, 3))
  smooth = _image_pair("gradient", 64, 44, seed=0)[0]
  images = np.stack([noise, smooth]).astype(np.float32)
  with torch.no_grad():
    ref_t = torch_model.pool_features(_torch_preprocess(images))
    ref, ref_logits = ref_t.numpy(), torch_model.fc(ref_t).numpy()
  model = metrics.load_inception(path, with_logits=True)
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
  assert ours.shape == (2, 2048)
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max() / scale
  print(f"inception pool features: max|diff|/max|ref| = {err:.2e} (scale {scale:.3g})")
  assert err < 1e-4
  # Not a degenerate network: the images' features differ far beyond the error.
  assert np.abs(ref[0] - ref[1]).max() > 1e-2 * scale
  logits = np.asarray(model.fc(jnp.asarray(ours)))
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max())
  # BatchNorm statistics are variables that stay fixed in "training" mode too.
  bn = model.Mixed_6e.branch_pool.bn
  assert isinstance(bn.mean, nnx.BatchStat)
  np.testing.assert_allclose(
      np.asarray(bn.var.get_value()),
      torch_model.Mixed_6e.branch_pool.bn.running_var.numpy(), rtol=1e-7)


def test_inception_importer_errors(torch_inception, tmp_path):
  _, path = torch_inception
  sd = hf_folder.load_weight_file(path)
  sd.pop("Mixed_7c.branch_pool.bn.running_var")
  from safetensors.numpy import save_file
  save_file(sd, str(tmp_path / "broken.safetensors"))
  with pytest.raises(hf_folder.ImportMismatchError, match="Mixed_7c.branch_pool.bn.var"):
    metrics.load_inception(tmp_path / "broken.safetensors")
  fid_like = dict(hf_folder.load_weight_file(path))
  fid_like["fc.weight"] = np.zeros((1008, 2048), np.float32)
  fid_like["fc.bias"] = np.zeros((1008,), np.float32)
  save_file(fid_like, str(tmp_path / "pt_inception.safetensors"))
  with pytest.raises(hf_folder.ImportMismatchError, match="pytorch-fid"):
    metrics.load_inception(tmp_path / "pt_inception.safetensors")
  with pytest.raises(hf_folder.CheckpointFolderError, match="inception_v3_google"):
    metrics.load_inception(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------
# LPIPS.

class TAlexNet(nn.Module):
  """torchvision.models.AlexNet (features + classifier, for the key names)."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(
        nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes))


class TNetLinLayer(nn.Module):
  def __init__(self, chn_in):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                       bias=False))


class TLPIPS(nn.Module):
  """lpips.LPIPS(net='alex', version='0.1') forward with normalize=True."""

  def __init__(self, alexnet: TAlexNet):
    super().__init__()
    f = alexnet.features
    self.slices = [f[0:2], f[2:5], f[5:8], f[8:10], f[10:12]]
    self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])
    self.lins = nn.ModuleList([TNetLinLayer(c) for c in (64, 192, 384, 256, 256)])

  def lin_state_dict(self):
    return {f"lin{k}.model.1.weight": lin.model[1].weight.detach().clone()
            for k, lin in enumerate(self.lins)}

  def trunk(self, x):
    outs = []
    for s in self.slices:
      x = s(x)
      outs.append(x)
    return outs

  def forward(self, in0, in1):
    in0, in1 = 2 * in0 - 1, 2 * in1 - 1
    outs0 = self.trunk((in0 - self.shift) / self.scale)
    outs1 = self.trunk((in1 - self.shift) / self.scale)

    def normalize_tensor(t, eps=1e-10):
      return t / (torch.sqrt(torch.sum(t ** 2, dim=1, keepdim=True)) + eps)

    val = 0
    for k in range(5):
      diff = (normalize_tensor(outs0[k]) - normalize_tensor(outs1[k])) ** 2
      val = val + self.lins[k].model(diff).mean([2, 3], keepdim=True)
    return val


@pytest.fixture(scope="module")
def torch_lpips(tmp_path_factory):
  torch.manual_seed(0)
  alex = TAlexNet()
  ref = TLPIPS(alex).eval()
  with torch.no_grad():  # the released heads are non-negative
    for lin in ref.lins:
      lin.model[1].weight.copy_(torch.rand_like(lin.model[1].weight) * 0.5)
  folder = tmp_path_factory.mktemp("lpips")
  torch.save(alex.state_dict(), folder / "alexnet-owt-test.pth")
  torch.save(ref.lin_state_dict(), folder / "alex.pth")
  return ref, folder / "alexnet-owt-test.pth", folder / "alex.pth"


def test_lpips_matches_torch(torch_lpips):
  ref_model, alex_path, lin_path = torch_lpips
  rng = np.random.default_rng(5)
  x = rng.random((3, 64, 48, 3)).astype(np.float32)
  y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  y[2] = x[2]  # identical pair -> 0
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x).permute(0, 3, 1, 2),
                    torch.from_numpy(y).permute(0, 3, 1, 2)).reshape(-1).numpy()
  model = metrics.load_lpips(alex_path, lin_path)
  ours = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(x), jnp.asarray(y)))
  print(f"lpips: ours {ours}, torch {ref}, max|diff| {np.abs(ours - ref).max():.2e}")
  assert ours.shape == (3,)
  assert ref[0] > 0.01 and abs(ours[2]) < 1e-10
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_lpips_importer_errors(torch_lpips, tmp_path):
  _, alex_path, lin_path = torch_lpips
  with pytest.raises(hf_folder.CheckpointFolderError, match="alex.pth"):
    metrics.load_lpips(alex_path, tmp_path / "missing.pth")
  with pytest.raises(hf_folder.CheckpointFolderError, match="alexnet-owt-7be5be79.pth"):
    metrics.load_lpips(tmp_path / "missing.pth", lin_path)
  with pytest.raises(hf_folder.ImportMismatchError, match="swapped"):
    metrics.load_lpips(lin_path, alex_path)


def test_inception_batchnorm_ignores_train_mode():
  """A feature extractor must not switch to batch statistics if someone calls
  ``model.train()`` on a larger module that holds it."""
  layer = jinception.BasicConv2d(3, 4, 3, rngs=nnx.Rngs(0))
  layer.bn.mean.set_value(jnp.full((4,), 0.3))
  layer.bn.var.set_value(jnp.full((4,), 2.0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  before = layer(x)
  layer.train()
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(before))
  np.testing.assert_allclose(np.asarray(layer.bn.mean.get_value()), 0.3)
