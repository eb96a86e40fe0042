"""Runs stage 2's frozen networks once over a split and stores their outputs.

  python -m data_prep.cache_features --config configs/synthetic.py:stage2 \\
      --split train --out cache/s2_train [--batch-size 32] [--config.FIELD=VALUE ...]
  python -m fpdm_jax.train --config configs/synthetic.py:stage2 --workdir runs/s2 \\
      --config.data.cached_features=cache/s2_train [the same --config.* overrides]

Per record of the split, in dataset order: the VAE posterior of the target
(mean and logvar; in pixel space the uint8 target view), the source tokens,
the stage-1 fusion embedding f(source, target pose), the uint8 target pose
image and the pair index (format: ``fpdm_jax/feature_cache.py``). Training
from the cache samples the latents from the stored posterior with the key
the image path would use, so the loss is the same.

Resumable: shards are written under a temporary name and renamed when
complete, and ``cache_info.json`` is written last; rerunning the same
command skips finished shards. With several processes (``FPDM_COORDINATOR``
etc., as for training; see launch/README.md) process p writes the shards
k with k % processes == p, each on its own devices; any process count can
finish a cache another started.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARD_BYTES = 1 << 30     # default shard size: a lost shard costs at most ~1 GiB of work
LOG_EVERY_S = 60.0
FEATURE_DTYPES = ("computed", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class RecordRange:
  """Records [start, end) of a random-access source, as a source."""
  source: object
  start: int
  end: int

  def __len__(self) -> int:
    return self.end - self.start

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source[self.start + index]


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _write_json_atomic(path: Path, data: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
  os.replace(tmp, path)


# What a cache's content and layout depend on; the rest of its info is provenance.
PLAN_KEYS = ("format", "fingerprint", "dataset.name", "dataset.split", "dataset.num_records",
             "fields", "record_bytes", "feature_dtype", "records_per_shard", "num_shards",
             "scaling_factor")


def _plan_difference(a: dict, b: dict) -> str | None:
  """The first plan key where two caches' plans differ, or None."""
  def get(d, dotted):
    for part in dotted.split("."):
      d = d.get(part) if isinstance(d, dict) else None
    return d
  for key in PLAN_KEYS:
    x, y = get(a, key), get(b, key)
    if x != y:
      if isinstance(x, dict) and isinstance(y, dict):
        sub = next(k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
        return f"{key} {sub}: {x.get(sub)!r} vs now {y.get(sub)!r}"
      return f"{key}: {x!r} vs now {y!r}"
  return None


def write_cache(config, split: str, out: str | os.PathLike, *, batch_size: int = 32,
                records_per_shard: int = 0, feature_dtype: str = "computed",
                worker_count: int | None = None, progress: bool = True) -> dict:
  """Writes (or finishes) the feature cache of ``split`` into ``out``; returns its info."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from array_record.python.array_record_module import ArrayRecordWriter
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from fpdm_jax import feature_cache as fc
  from fpdm_jax import input_pipeline
  from fpdm_jax.trainers import common, stage2

  if config.stage != "stage2":
    raise ValueError(f"the config's stage is {config.stage!r}: feature caches are for stage 2")
  if feature_dtype not in FEATURE_DTYPES:
    raise ValueError(f"feature dtype {feature_dtype!r}: one of {FEATURE_DTYPES}")
  n_local = jax.local_device_count()
  if batch_size % n_local:
    raise ValueError(f"--batch-size {batch_size} is not divisible by this process's "
                     f"{n_local} devices")
  out = Path(out).expanduser()
  d = config.data
  source = input_pipeline.open_source(d.data_dir, d.name, split)
  num_records = len(source)

  frozen, views, _ = stage2.build_frozen(config)
  latent = bool(config.model.latent)
  device_views = {k: views[k] for k in ("target", "source_clip", "pose_clip", "source_enc")
                  if k in views and (k != "target" or latent)}
  host_views = ["target_pose"] + ([] if latent else ["target"])
  loader_views = {**device_views, **{k: views[k] for k in host_views}}
  frozen_def = common.ModelDef(frozen)
  mesh = Mesh(np.array(jax.local_devices()), ("data",))
  params = jax.device_put(common.pure_params(frozen), NamedSharding(mesh, P()))
  batch_sharding = NamedSharding(mesh, P("data"))
  cast = None if feature_dtype == "computed" else jnp.dtype(feature_dtype)

  def compute(params, batch):
    nets = frozen_def(params)
    return stage2.frozen_outputs(nets, input_pipeline.normalise(batch, device_views),
                                 encode_target=latent)

  def encode(params, batch):
    outs = compute(params, batch)
    if cast is not None:
      outs = {k: v.astype(cast) if jnp.issubdtype(v.dtype, jnp.floating) else v
              for k, v in outs.items()}
    return outs

  encode = jax.jit(encode)
  parsed = input_pipeline.parse_views(loader_views)
  batch_spec = {k: jax.ShapeDtypeStruct((batch_size, *parsed[k].size, 3), jnp.uint8)
                for k in device_views}
  computed, stored = (jax.eval_shape(f, params, batch_spec) for f in (compute, encode))
  names = (["latent_mean", "latent_logvar"] if latent else []) + ["tokens", "fusion"]
  fields = []
  for n in names:
    as_computed, as_stored = (jnp.dtype(t[n].dtype).name for t in (computed, stored))
    fields.append(fc.Field(n, tuple(stored[n].shape[1:]), as_stored,
                           as_computed if as_computed != as_stored else None))
  if not latent:
    fields.insert(0, fc.Field("target", (*parsed["target"].size, 3), "uint8"))
  fields += [fc.Field("target_pose", (*parsed["target_pose"].size, 3), "uint8"),
             fc.Field("pair_index", (), "int64")]
  record_bytes = fc.record_nbytes(fields)
  per_shard = records_per_shard or max(1, SHARD_BYTES // record_bytes)
  per_shard = min(per_shard, max(1, num_records))
  num_shards = max(1, math.ceil(num_records / per_shard))

  plan = {
      "format": fc.FORMAT,
      "fingerprint": fc.fingerprint(config),
      "dataset": {"name": d.name, "split": split, "num_records": num_records,
                  "data_dir": os.path.realpath(os.path.expanduser(d.data_dir))},
      "fields": [f.to_json() for f in fields],
      "record_bytes": record_bytes,
      "feature_dtype": feature_dtype,
      "records_per_shard": per_shard,
      "num_shards": num_shards,
      "scaling_factor": float(frozen.vae.scaling_factor) if latent else None,
      "config": json.loads(config.to_json_best_effort()),
  }
  info_path, plan_path = out / fc.INFO_NAME, out / fc.PLAN_NAME
  existing = info_path if info_path.is_file() else plan_path if plan_path.is_file() else None
  if existing is not None and records_per_shard == 0:
    # Auto shard size: keep the existing cache's shard boundaries.
    started = json.loads(existing.read_text())
    plan.update(records_per_shard=started.get("records_per_shard"),
                num_shards=started.get("num_shards"))
    per_shard, num_shards = plan["records_per_shard"], plan["num_shards"]
  if info_path.is_file():
    info = json.loads(info_path.read_text())
    diff = _plan_difference(info, plan)
    if diff is None:
      logging.info("%s is already a complete cache of %s/%s (%d records)", out, d.name, split,
                   info["num_records"])
      return info
    raise fc.CacheMismatch(f"--out {out} already holds a complete feature cache made "
                           f"differently ({diff}): choose another --out, or delete it to "
                           "rebuild")
  if plan_path.is_file():
    diff = _plan_difference(json.loads(plan_path.read_text()), plan)
    if diff is not None:
      raise fc.CacheMismatch(f"--out {out} holds an unfinished feature cache started "
                             f"differently ({diff}): rerun it with its settings, choose "
                             "another --out, or delete it")
  elif jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(plan_path, plan)
  _barrier("cache_features_plan")

  p, n_proc = jax.process_index(), jax.process_count()
  mine = [k for k in range(num_shards) if k % n_proc == p]
  todo = [k for k in mine if not (out / fc.shard_name(k, num_shards)).is_file()]
  ranges = {k: (k * per_shard, min((k + 1) * per_shard, num_records)) for k in todo}
  total = sum(e - s for s, e in ranges.values())
  logging.info("Feature cache %s: %d records of %s/%s in %d shards of %d (%.1f KiB per "
               "record); this process writes %d shards (%d records), %d already done",
               out, num_records, d.name, split, num_shards, per_shard, record_bytes / 1024,
               len(todo), total, len(mine) - len(todo))
  from tqdm import tqdm
  bar = tqdm(total=total, unit="rec", desc="caching features", disable=None if progress else True)
  t0 = last_log = time.perf_counter()
  done = 0
  workers = d.worker_count if worker_count is None else worker_count

  def write_rows(writer, local, result, valid):
    host = jax.device_get(result)
    for r in range(valid):
      values = {n: host[n][r] for n in names}
      values.update({k: local[k][r] for k in host_views}, pair_index=local["pair_index"][r])
      writer.write(fc.encode_record(fields, values))
    return valid

  for k in todo:
    start, end = ranges[k]
    loader = input_pipeline.make_loader(
        input_pipeline.LoaderConfig(
            data_dir=d.data_dir, name=d.name, split=split, views=loader_views,
            batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
            worker_count=workers),
        process_index=0, process_count=1, source=RecordRange(source, start, end))
    final = out / fc.shard_name(k, num_shards)
    tmp = final.with_name(final.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    pending = None
    for i, local in enumerate(loader):
      valid = input_pipeline.valid_rows(end - start, batch_size, i)
      batch = {v: jax.device_put(local[v], batch_sharding) for v in device_views}
      result = encode(params, batch)  # dispatched: the device works while we write
      if pending is not None:
        n = write_rows(writer, *pending)
        done += n
        bar.update(n)
      pending = (local, result, valid)
      now = time.perf_counter()
      if now - last_log > LOG_EVERY_S:
        logging.info("cached %d/%d records, %.1f records/s", done, total, done / (now - t0))
        last_log = now
    if pending is not None:
      n = write_rows(writer, *pending)
      done += n
      bar.update(n)
    writer.close()
    os.replace(tmp, final)
  bar.close()
  elapsed = time.perf_counter() - t0
  rate = done / elapsed if elapsed > 0 else 0.0
  logging.info("Wrote %d records in %.1f s (%.1f records/s) on process %d", done, elapsed,
               rate, p)
  _barrier("cache_features_shards")

  info = None
  if p == 0:
    from array_record.python.array_record_module import ArrayRecordReader
    shards = []
    for k in range(num_shards):
      path = out / fc.shard_name(k, num_shards)
      if not path.is_file():
        raise fc.CacheIncomplete(f"shard {path} is missing after all processes finished")
      reader = ArrayRecordReader(str(path))
      count = reader.num_records()
      reader.close()
      start, end = k * per_shard, min((k + 1) * per_shard, num_records)
      if count != end - start:
        raise fc.CacheIncomplete(f"shard {path} holds {count} records, expected "
                                 f"{end - start}; delete it and rerun")
      shards.append({"file": path.name, "start": start, "num_records": count})
    info = dict(plan, num_records=num_records, shards=shards,
                stats={"last_run_records": done, "last_run_s": round(elapsed, 2),
                       "last_run_records_per_s": round(rate, 2), "batch_size": batch_size,
                       "processes": n_proc})
    _write_json_atomic(info_path, info)
    plan_path.unlink(missing_ok=True)
  _barrier("cache_features_info")
  return info if info is not None else fc.read_info(out)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from fpdm_jax import config_lib
  overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.cache_features", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any config field can be overridden as --config.FIELD=VALUE; use the same "
             "overrides as the training run (the cache records the fields it depends on "
             "and training checks them).")
  parser.add_argument("--config", required=True, help="a stage-2 config, configs/FILE.py:VARIANT")
  parser.add_argument("--split", help="dataset split (default: the config's data.train_split)")
  parser.add_argument("--out", required=True, help="cache directory to write (or finish)")
  parser.add_argument("--batch-size", type=int, default=32,
                      help="records per encoder call (default: %(default)s)")
  parser.add_argument("--records-per-shard", type=int, default=0,
                      help="records per ArrayRecord shard, the unit of resumption "
                           "(default 0: about 1 GiB per shard)")
  parser.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default="computed",
                      help="store float features as computed (model.dtype; exact) or cast, "
                           "e.g. bfloat16 to halve the size (default: %(default)s)")
  parser.add_argument("--workers", type=int,
                      help="Grain worker processes decoding images (default: data.worker_count)")
  args = parser.parse_args(rest)
  from fpdm_jax.train import setup_logging
  setup_logging()
  try:
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from fpdm_jax import distributed, feature_cache
  try:
    distributed.initialize()
    info = write_cache(config, args.split or config.data.train_split, args.out,
                       batch_size=args.batch_size, records_per_shard=args.records_per_shard,
                       feature_dtype=args.feature_dtype, worker_count=args.workers)
  except (FileNotFoundError, ValueError, feature_cache.CacheMismatch) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  size = info["record_bytes"] * info["num_records"]
  print(f"Feature cache of {info['dataset']['name']}/{info['dataset']['split']}: "
        f"{info['num_records']} records, {size / 2 ** 30:.2f} GiB in {args.out}")
  print(f"Train from it with --config.data.cached_features={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
