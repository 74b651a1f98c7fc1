"""The Dataset the trainer iterates: deterministic, resumable, sharded batches.

Train order contract: global step s belongs to epoch s // steps_per_epoch.
Each epoch orders the train set from (seed, epoch) alone, keeps the first
steps_per_epoch * batch_size records (the remainder is dropped), and gives
the example at position i of the epoch the augmentation seed
(seed, epoch, i). Batches therefore depend only on (seed, step): resuming at
step k builds epoch k // steps_per_epoch directly and skips records, never
decoded images, up to the resume point.

Multi-process: process p's share of each global batch is the contiguous
slice [p * b, (p + 1) * b), so the global batch is the same for any process
count. Random-access sources (digits, image folders, TFDS in ArrayRecord
format) compute the epoch order as an array of record ids and hand each
process only the ids of its slices, so a process reads and decodes its own
examples and nothing else, and a resume reads nothing before its step.
Streaming sources (TFDS in TFRecord format) cannot seek: every process reads
the whole stream up to its last example and keeps its slices.

Repeated augmentation (DeiT's RASampler, `repeats` > 1): the epoch's order
keeps its first ceil(num_train / repeats) records, each repeated `repeats`
times in a row, and is cut back to num_train records, so epochs keep their
length. Copies sit at different positions and so get different
augmentation seeds. This is RASampler's list before it deals it out to
replicas: RASampler gives replica r every W-th entry, so the W replicas'
batches at one step together hold a contiguous run of that list, which is
exactly our global batch. Only the split within the global batch differs:
RASampler puts the copies of an image on different replicas, our contiguous
slices mostly keep them on one process. Nothing here computes statistics
per process (LayerNorm, Mixup/CutMix on the global batch), so the trained
model sees the same thing, and the global batch stays independent of the
process count.
"""

import math

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from modassem.data import augment, sources
from modassem.data._tf import graph_fn, tf
from modassem.errors import ModassemError

Batch = dict[str, np.ndarray]

# fold_in key of the post-normalisation seed; the pre-normalisation transform
# keeps the example seed itself, so adding erasing changes nothing before it.
_AFTER_NORMALIZE_KEY = 1


def repeat_ids(order: np.ndarray, num_train: int, repeats: int) -> np.ndarray:
  """RASampler's epoch order: first ceil(n / r) ids, each r times, n kept."""
  if repeats <= 1:
    return order
  return np.repeat(order[:math.ceil(num_train / repeats)], repeats)[:num_train]


def slice_positions(batch_size: int, local: int, process_index: int,
                    first_step: int, num_steps: int) -> np.ndarray:
  """Positions in the epoch of process p's examples at steps [first, first + n)."""
  steps = np.arange(first_step, first_step + num_steps, dtype=np.int64)
  offsets = process_index * local + np.arange(local, dtype=np.int64)
  return (steps[:, None] * batch_size + offsets[None, :]).reshape(-1)


def repeat_records(records, num_train: int, repeats: int):
  """`repeat_ids` for a stream of records (the streaming TFDS source)."""
  if repeats <= 1:
    return records
  t = tf()
  chosen = records.take(math.ceil(num_train / repeats))

  def copies(record):
    return t.nest.map_structure(
        lambda x: t.repeat(x[None], repeats, axis=0), record)

  return chosen.map(graph_fn(copies)).unbatch().take(num_train)


def _local_batch_size(batch_size: int, process_index: int,
                      process_count: int) -> int:
  if batch_size <= 0:
    raise ModassemError(
        f"batch size {batch_size} must be positive: set a positive batch size")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ModassemError(
        f"process_index={process_index} is not in [0, process_count="
        f"{process_count}): pass jax.process_index() and jax.process_count()")
  if batch_size % process_count:
    raise ModassemError(
        f"global batch size {batch_size} is not divisible by the "
        f"{process_count} processes: choose a multiple of {process_count}")
  return batch_size // process_count


def _slice_filter(batch_size: int, local: int, process_index: int):
  """Keeps positions in this process's slice of each global batch."""
  lo = process_index * local
  hi = lo + local

  def keep(pos, record):
    del record
    offset = pos % batch_size
    return tf().logical_and(offset >= lo, offset < hi)

  return graph_fn(keep)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train/eval batches of one image classification source.

  Build with `modassem.data.build`. Batches are dicts of numpy arrays:
  "image" float32 [b, H, W, 3] normalised, "label" int32 [b], and for eval
  also "mask" float32 [b] (1 real example, 0 padding).
  """
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  image_size: int
  source: Any = dataclasses.field(repr=False)
  train_transform: augment.Transform = dataclasses.field(repr=False)
  mean: tuple[float, ...] = dataclasses.field(repr=False)
  std: tuple[float, ...] = dataclasses.field(repr=False)
  eval_crop_ratio: float = dataclasses.field(repr=False, default=0.875)
  prefetch: int = dataclasses.field(repr=False, default=2)
  threads: int = dataclasses.field(repr=False, default=0)
  # Random erasing: runs on the normalised image, as timm does.
  after_normalize: augment.Transform | None = dataclasses.field(
      repr=False, default=None)
  # Repeated augmentation: copies of each chosen image per epoch (1 = off).
  repeats: int = dataclasses.field(repr=False, default=1)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    steps = self.num_train // batch_size if batch_size > 0 else 0
    if steps == 0:
      raise ModassemError(
          f"batch size {batch_size} does not fit the {self.num_train} train "
          f"examples of {self.name}: use a positive batch size of at most "
          f"{self.num_train}")
    return steps

  def _options(self):
    options = tf().data.Options()
    options.deterministic = True
    if self.threads > 0:
      options.threading.private_threadpool_size = self.threads
    return options

  def _parallel(self):
    return tf().data.AUTOTUNE if self.threads <= 0 else self.threads

  def _train_example(self, seed: int, epoch: int, pos, record):
    t = tf()
    image, label = self.source.decode(record)
    # Stateless seed keyed on the example's place in the global order, not
    # on the process or the resume point.
    example_seed = t.stack(
        [t.constant(seed, t.int64), t.constant(epoch * 2**32, t.int64) + pos])
    image = self.train_transform(image, example_seed)
    image = t.ensure_shape(image, [self.image_size, self.image_size, 3])
    image = augment.normalize(image, self.mean, self.std)
    if self.after_normalize is not None:
      image = self.after_normalize(
          image, t.random.experimental.stateless_fold_in(
              example_seed, _AFTER_NORMALIZE_KEY))
    return {"image": image, "label": t.cast(label, t.int32)}

  def _eval_example(self, pos, record):
    del pos
    t = tf()
    image, label = self.source.decode(record)
    if self.source.eval_centre_crop:
      image = augment.resize_shorter_and_centre_crop(
          image, self.image_size, self.eval_crop_ratio)
    else:
      image = augment.resize(image, self.image_size)
    image = t.ensure_shape(image, [self.image_size, self.image_size, 3])
    return {
        "image": augment.normalize(image, self.mean, self.std),
        "label": t.cast(label, t.int32),
        "mask": t.constant(1.0, t.float32),
    }

  def _train_epoch(self, batch_size: int, local: int, process_index: int,
                   seed: int, epoch: int, first_step: int):
    """This process's batches of one epoch, from step `first_step` on."""
    steps = self.steps_per_epoch(batch_size)
    if self.source.random_access:
      order = repeat_ids(self.source.train_order(seed, epoch), self.num_train,
                         self.repeats)
      positions = slice_positions(batch_size, local, process_index,
                                  first_step, steps - first_step)
      ds = tf().data.Dataset.from_tensor_slices(
          (positions, order[positions].astype(np.int64)))
      ds = self.source.fetch(ds)
    else:
      offset, end = first_step * batch_size, steps * batch_size
      ds = repeat_records(self.source.train_records(seed, epoch),
                          self.num_train, self.repeats).enumerate()
      # A stream cannot seek: records before `offset` and other processes'
      # records are read, but never decoded or augmented.
      ds = ds.skip(offset).take(end - offset)
      ds = ds.filter(_slice_filter(batch_size, local, process_index))
    ds = ds.map(graph_fn(lambda pos, r: self._train_example(seed, epoch, pos, r)),
                num_parallel_calls=self._parallel())
    ds = ds.batch(local, drop_remainder=True).prefetch(self.prefetch)
    return ds.with_options(self._options())

  def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                    process_index: int = 0,
                    process_count: int = 1) -> Iterator[Batch]:
    """Infinite iterator over this process's share of the global batches.

    `batch_size` is the global batch; each step yields
    batch_size // process_count examples. The global batch at step s is a
    pure function of (seed, s); see the module docstring.
    """
    local = _local_batch_size(batch_size, process_index, process_count)
    steps = self.steps_per_epoch(batch_size)
    if start_step < 0:
      raise ModassemError(
          f"start_step={start_step} is negative: resume from step 0 or later")
    # np.random.default_rng and TF seeds need a non-negative 63-bit seed.
    seed = int(seed) % 2**63
    epoch, step_in_epoch = divmod(int(start_step), steps)

    def batches():
      e, first = epoch, step_in_epoch
      while True:
        ds = self._train_epoch(batch_size, local, process_index, seed, e,
                               first)
        yield from ds.as_numpy_iterator()
        e, first = e + 1, 0

    return _named_errors(batches(), self.source_files("train"))

  def eval_batches(self, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
    """One pass over the eval split in fixed order, padded to full batches.

    Every eval example appears exactly once across all processes, with
    "mask" 1; padding (only in the last global batch) has "mask" 0.
    """
    local = _local_batch_size(batch_size, process_index, process_count)
    n = self.num_eval
    num_batches = -(-n // batch_size)
    starts = np.arange(num_batches) * batch_size + process_index * local
    num_real = int(np.clip(n - starts, 0, local).sum())
    num_pad = num_batches * local - num_real

    t = tf()
    if self.source.random_access:
      positions = slice_positions(batch_size, local, process_index, 0,
                                  num_batches)
      positions = positions[positions < n]
      ds = t.data.Dataset.from_tensor_slices(
          (positions, self.source.eval_order()[positions].astype(np.int64)))
      ds = self.source.fetch(ds)
    else:
      ds = self.source.eval_records().enumerate()
      ds = ds.filter(_slice_filter(batch_size, local, process_index))
    ds = ds.map(graph_fn(self._eval_example), num_parallel_calls=self._parallel())
    size = self.image_size
    padding = t.data.Dataset.from_tensors({
        "image": t.zeros([size, size, 3], t.float32),
        "label": t.constant(0, t.int32),
        "mask": t.constant(0.0, t.float32),
    }).repeat(num_pad)
    ds = ds.concatenate(padding)
    ds = ds.batch(local, drop_remainder=True).prefetch(self.prefetch)
    return _named_errors(ds.with_options(self._options()).as_numpy_iterator(), self.source_files("eval"))

  def source_files(self, which: str) -> list[str]:
    """The record files of the train or eval split, where the source reads records from files."""
    files = getattr(self.source, "record_files", None)
    return files(which) if files is not None else []


def _named_errors(batches, record_files=()):
  """`batches`, with a file that cannot be decoded, and a corrupt TFRecord file among `record_files`, reported as
  one ModassemError naming it."""
  try:
    yield from batches
  except tf().errors.DataLossError as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split("}}")[-1].strip()
    raise ModassemError(f"{_corrupt_file(record_files)} is damaged ({first}): prepare the dataset again "
                        "(`tfds build`), or restore the file from a copy") from None
  except tf().errors.InvalidArgumentError as e:
    message = sources.bad_image(e)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if message is None and any(w in first.lower() for w in ("image", "jpeg", "png", "gif", "bmp")):
      # Damage the byte check cannot see (inside the compressed data): TF's decoder names no file.
      message = (f"an image cannot be decoded ({first}): find it with PIL's Image.open(path).load() over the "
                 "files under data.path, or check the TFDS dataset's preparation")
    if message is None:
      raise
    raise ModassemError(message) from None


# Checking every file costs a read of the whole split: done on the error path only, and only up to this size.
_SCAN_BYTES = 4 << 30


def _corrupt_file(record_files: list) -> str:
  """The first of `record_files` whose records do not read back whole, found by reading them; the files' folder
  where there are too many bytes to read, or none is found."""
  if len(record_files) == 1:
    return f"the TFRecord file {record_files[0]}"
  t = tf()
  if record_files and sum(t.io.gfile.stat(f).length for f in record_files) <= _SCAN_BYTES:
    for f in record_files:
      try:
        for _ in t.data.TFRecordDataset(f):
          pass
      except t.errors.DataLossError:
        return f"the TFRecord file {f}"
  where = os.path.dirname(record_files[0]) if record_files else "the dataset"
  return f"a TFRecord file of the {len(record_files)} in {where}"
