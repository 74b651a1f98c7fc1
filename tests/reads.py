"""Which records each process of a job reads, on a TFDS dataset in ArrayRecord files.

    python tests/reads.py DATA_DIR PROCESSES DEVICES_EACH START:STEPS [START:STEPS ...]

Writes the tiny dataset to DATA_DIR unless it exists, then starts PROCESSES processes (JAX's distributed runtime on localhost). Each
builds the dataset, counts the records its ArrayRecord readers return, and
for each START:STEPS takes STEPS batches of `train_batches` from step START;
prints a JSON list, one entry per process: for each START:STEPS the indices
of the train records it read and the example ids of its batches. The count
is taken at TFDS's reader, under the whole tf.data pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from processes import REPO, env_with_devices, free_port  # noqa: E402

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


def _worker(data_dir: str, coordinator: str, processes: int, process_id: int, spans: list) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from modassem import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(coordinator, processes, process_id)
  ds, counter = counted_dataset(data_dir)
  out = {"process": jax.process_index(), "devices": jax.local_device_count(), "spans": {}}
  for span in spans:
    start, steps = (int(v) for v in span.split(":"))
    out["spans"][span] = take(ds, counter, start, steps, jax.process_index(), jax.process_count())
  print(json.dumps(out))


def main(argv) -> None:
  if argv[0] == "--worker":
    _worker(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5:])
    return
  data_dir, processes, devices, spans = argv[0], int(argv[1]), int(argv[2]), argv[3:]
  if not os.path.exists(data_dir):
    write_tiny_tfds(data_dir, "array_record")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", data_dir, coordinator,
                             str(processes), str(i), *spans],
                            cwd=REPO, env=env_with_devices(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(processes)]
  outs = [p.communicate(timeout=300) for p in procs]
  failed = [err for p, (_, err) in zip(procs, outs) if p.returncode]
  if failed:
    sys.exit("\n".join(e[-3000:] for e in failed))
  print(json.dumps([json.loads(out.strip().splitlines()[-1]) for out, _ in outs]))


if __name__ == "__main__":
  main(sys.argv[1:])
