"""Which records each process of a job reads, on a TFDS dataset in ArrayRecord files.

One part of a job of several processes (processes.py, part "reads"): process 0
writes the tiny dataset unless it exists; each process builds the dataset,
counts the records its ArrayRecord readers return, and for each START:STEPS
takes STEPS batches of `train_batches` from step START. `member` returns, for
each START:STEPS, the indices of the train records it read and the example ids
of its batches. The count is taken at TFDS's reader, under the whole tf.data
pipeline.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

NAME = "modassem_tiny_images"
BATCH = 10
SEED = 3


def write_tiny_tfds(data_dir: str, file_format: str, num_train: int = 30, num_test: int = 7) -> str:
  """A real TFDS dataset; example i's image is constant i * 6 (ids survive normalisation), label i % 3."""
  from modassem.data._tf import tfds  # pylint: disable=g-import-not-at-top
  t = tfds()
  features = t.features.FeaturesDict({
      "image": t.features.Image(shape=(None, None, 3)),
      "label": t.features.ClassLabel(num_classes=3),
  })

  def examples(ids):
    for i in ids:
      yield i, {"image": np.full((10 + i % 4, 12, 3), i * 6, np.uint8), "label": i % 3}

  t.dataset_builders.store_as_tfds_dataset(
      name=NAME, version="1.0.0", features=features,
      split_datasets={"train": examples(range(num_train)), "test": examples(range(num_train, num_train + num_test))},
      data_dir=data_dir, file_format=file_format)
  return data_dir


def example_ids(images: np.ndarray) -> np.ndarray:
  """Example ids of a batch of the tiny dataset (augment "none")."""
  from modassem import data as data_lib  # pylint: disable=g-import-not-at-top
  config = data_lib.default_config()
  pixels = images * np.array(config.std, np.float32) + np.array(config.mean, np.float32)
  return np.round(pixels[:, 0, 0, 0] * 255 / 6).astype(int)


class Counting:
  """An ArrayRecord data source that notes every index read through it."""

  def __init__(self, reader):
    self.reader, self.read = reader, []

  def __len__(self):
    return len(self.reader)

  def __getitems__(self, indices):
    self.read.extend(int(i) for i in indices)
    return self.reader.__getitems__(indices)


def counted_dataset(data_dir: str):
  """The tiny dataset with its train reader counted; returns (dataset, counter)."""
  from modassem import data as data_lib  # pylint: disable=g-import-not-at-top
  config = data_lib.default_config()
  config.update(name="tfds", tfds_name=NAME, tfds_data_dir=data_dir, augment="none")
  ds = data_lib.build(config, image_size=8)
  counter = Counting(ds.source.train_reader)
  return dataclasses.replace(ds, source=dataclasses.replace(ds.source, train_reader=counter)), counter


def take(ds, counter, start: int, steps: int, process_index: int = 0, process_count: int = 1) -> dict:
  """This process's batches START..START+STEPS and the records read to make them."""
  counter.read.clear()
  batches = ds.train_batches(BATCH, seed=SEED, start_step=start, process_index=process_index,
                             process_count=process_count)
  ids = [example_ids(next(batches)["image"]).tolist() for _ in range(steps)]
  return {"read": list(counter.read), "batches": ids}


def member(data_dir: str, spans: list) -> dict:
  """This process's reads for each START:STEPS of `spans`, in a job whose distributed runtime is up; process 0
  writes the dataset first unless it exists."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0 and not os.path.exists(data_dir):
    write_tiny_tfds(data_dir, "array_record")
  multihost_utils.sync_global_devices("the tiny dataset is written")
  ds, counter = counted_dataset(data_dir)
  out = {"process": jax.process_index(), "devices": jax.local_device_count(), "spans": {}}
  for span in spans:
    start, steps = (int(v) for v in span.split(":"))
    out["spans"][span] = take(ds, counter, start, steps, jax.process_index(), jax.process_count())
  return out


