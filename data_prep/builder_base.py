"""The TFDS builder every pair dataset derives from.

Subclasses say how to list a split's pairs (``_pair_specs``) and how to turn
one into a record (``_processor``); this class stages them resumably,
writes ArrayRecord shards in pair order (record i is pair i, so evaluation
output names and dataset order agree) and writes ``prep_report.json``.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import shutil
from pathlib import Path

import tensorflow_datasets as tfds

from data_prep import pairs


@dataclasses.dataclass(eq=False)
class PairConfig(tfds.core.BuilderConfig):
  height: int = 64
  width: int = 64


class PairDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  PHOTO_FORMAT = "png"
  SPLITS = ("train", "test")

  def __init__(self, *, workers: int = 1, strict: bool = False,
               chunk_size: int = 256, keep_staging: bool = False, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.workers, self.strict = workers, strict
    self.chunk_size, self.keep_staging = chunk_size, keep_staging
    self.report = pairs.SkipReport()

  # -- to implement ---------------------------------------------------------
  @abc.abstractmethod
  def _pair_specs(self, split: str) -> list:
    """Everything needed to build each pair of ``split``, in pair order."""

  @abc.abstractmethod
  def _processor(self, split: str):
    """A picklable callable spec -> record for ``split`` (runs in worker processes)."""

  # -- TFDS -----------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    info = self.dataset_info_from_configs(
        features=pairs.pair_features(self.builder_config.height,
                                     self.builder_config.width, self.PHOTO_FORMAT),
        disable_shuffling=True,  # record i is pair i; training shuffles in Grain
    )
    # TFDS looks a not-yet-built dataset up in its public GCS bucket, and makes
    # an empty /tmp/tmp*tfds directory for that on every builder it creates,
    # which it never removes. Ours are never in that bucket.
    info.initialize_from_bucket = lambda: None
    return info

  @property
  def staging_dir(self) -> Path:
    return Path(self.data_dir_root) / "_staging" / self.name / self.builder_config.name

  def _split_generators(self, dl_manager):
    del dl_manager
    out = {}
    for split in self.SPLITS:
      specs = self._pair_specs(split)
      paths = pairs.stage_split(
          self._processor(split), specs, self.staging_dir, split=split,
          chunk_size=self.chunk_size, workers=self.workers, strict=self.strict,
          report=self.report, desc=f"{self.name} {split}")
      written = self.report.written[split]
      out[split] = self._generate_examples(paths, split, written)
    return out

  def _generate_examples(self, paths, split: str, total: int):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"writing {split} shards", unit="pair", disable=None)
    for index, record in pairs.iter_staged(paths):
      bar.update(1)
      yield index, pairs.to_tfds_example(record)
    bar.close()

  def build(self) -> dict:
    """download_and_prepare + prep_report.json; returns the report.

    A dataset that is already complete is left alone and its report returned.
    """
    report_path = Path(self.data_dir) / "prep_report.json"
    if self.is_prepared() and report_path.exists():
      return json.loads(report_path.read_text())
    tfds.disable_progress_bar()  # ours show staging and writing progress
    self.download_and_prepare()
    report = pairs.write_report(self.report, report_path,
                                {"dataset": f"{self.name}/{self.builder_config.name}",
                                 "data_dir": str(self.data_dir)})
    if not self.keep_staging:
      shutil.rmtree(self.staging_dir, ignore_errors=True)
    return report
