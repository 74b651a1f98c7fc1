"""TensorFlow Datasets source (imagenet2012, cifar100, ...), streaming.

TFDS stores examples in record files that can only be read in sequence, so an
epoch is not an exact permutation as for the random-access sources. What is
deterministic, and what this source relies on:

* With `shuffle_files=True` and a `ReadConfig.shuffle_seed`, TFDS shuffles
  the shard order from that seed and interleaves shards in a fixed order
  (tf.data `deterministic` is on). Each epoch gets its own seed, drawn from
  (run seed, epoch), followed by a seeded shuffle buffer of
  `SHUFFLE_BUFFER` records.
* The order is therefore a pure function of (seed, epoch) for a given
  prepared copy of the data (same shards) and the same TF/TFDS versions.
  Re-preparing the dataset or upgrading TFDS may change it.
* Resuming mid-epoch reads (but never decodes or augments) the records that
  come before the resume point, because a record stream cannot seek. Every
  process reads the whole stream and keeps its slice of each global batch.

Images are read still encoded (`SkipDecoding`) and decoded only after the
pipeline has dropped the records it skips.
"""

import dataclasses
import functools

import numpy as np

from modassem.data._tf import tf
from modassem.data._tf import tfds
from modassem.data.sources import subset_ids
from modassem.errors import ModassemError

# Records held by the shuffle buffer (still JPEG/PNG encoded: ~1 GB for
# ImageNet-sized images), on top of the per-epoch shard shuffle.
SHUFFLE_BUFFER = 10_000

# Shards read at once; fixed so the interleaved order never depends on the
# number of host cores.
INTERLEAVE_CYCLE = 16


def _read_config(shuffle_seed=None, add_tfds_id=False):
  options = tf().data.Options()
  options.deterministic = True
  return tfds().ReadConfig(
      options=options,
      # Auto-caching would freeze the first epoch's order for small sets.
      try_autocache=False,
      shuffle_seed=shuffle_seed,
      add_tfds_id=add_tfds_id,
      interleave_cycle_length=INTERLEAVE_CYCLE,
      interleave_block_length=1)


def _builder(data):
  name = str(data.get("tfds_name", "") or "")
  if not name:
    raise ModassemError(
        "data.tfds_name is empty: set --config.data.tfds_name, e.g. "
        "imagenet2012 or cifar100")
  data_dir = str(data.get("tfds_data_dir", "") or "") or None
  where = data_dir or "the TFDS default data dir (~/tensorflow_datasets)"
  try:
    builder = tfds().builder(name, data_dir=data_dir)
  except tfds().core.registered.DatasetNotFoundError as e:
    # TFDS's own message lists its whole catalogue; keep ours to one line.
    raise ModassemError(
        f"TFDS dataset {name!r} is neither in the TFDS catalogue nor "
        f"prepared in {where}: check --config.data.tfds_name and "
        "--config.data.tfds_data_dir") from e
  if builder.is_prepared():
    return builder
  manual_dir = str(data.get("manual_dir", "") or "")
  if not data.get("download", False):
    raise ModassemError(
        f"TFDS dataset {name!r} is not prepared in {where}: run `tfds build "
        f"{name} --data_dir=DIR` (imagenet2012 also needs "
        "--manual_dir=DIR_WITH_THE_IMAGENET_TARS) and pass "
        "--config.data.tfds_data_dir=DIR, or set --config.data.download=True")
  config = tfds().download.DownloadConfig(manual_dir=manual_dir or None)
  builder.download_and_prepare(download_config=config)
  return builder


def _keys(builder) -> tuple[str, str]:
  keys = builder.info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(
      isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def _num_examples(builder, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError) as e:
    raise ModassemError(
        f"TFDS dataset {builder.name!r} has no split {split!r} (splits: "
        f"{sorted(builder.info.splits)}): set --config.data.train_split / "
        "--config.data.eval_split") from e


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """Streams a prepared TFDS dataset; see the module doc for determinism."""
  name: str
  builder: object
  image_key: str
  label_key: str
  num_classes: int
  train_split: str
  eval_split: str
  num_train: int
  num_eval: int
  # Sorted tfds_ids of the kept train records, or None to keep all.
  keep_ids: np.ndarray | None = None
  eval_centre_crop: bool = True

  def _read(self, split, shuffle_seed=None, add_tfds_id=False):
    return self.builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        decoders={self.image_key: tfds().decode.SkipDecoding()},
        read_config=_read_config(shuffle_seed, add_tfds_id))

  @functools.cached_property
  def _keep_table(self):
    # Created eagerly, outside any traced function, so every epoch's
    # pipeline shares one table.
    with tf().init_scope():
      keys = tf().constant(self.keep_ids)
      init = tf().lookup.KeyValueTensorInitializer(
          keys, tf().ones_like(keys, tf().int32))
      return tf().lookup.StaticHashTable(init, default_value=0)

  def train_records(self, seed: int, epoch: int):
    rng = np.random.default_rng([seed, epoch])
    file_seed, buffer_seed = (int(s) for s in rng.integers(2**31, size=2))
    ds = self._read(self.train_split, file_seed, self.keep_ids is not None)
    if self.keep_ids is not None:
      table = self._keep_table
      ds = ds.filter(lambda ex: table.lookup(ex["tfds_id"]) > 0)
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=buffer_seed,
                    reshuffle_each_iteration=False)
    return ds.map(self._record)

  def eval_records(self):
    return self._read(self.eval_split).map(self._record)

  def _record(self, ex):
    return {"image": ex[self.image_key], "label": ex[self.label_key]}

  def decode(self, record):
    image = tf().io.decode_image(
        record["image"], channels=3, expand_animations=False)
    image = tf().ensure_shape(image, [None, None, 3])
    return image, tf().cast(record["label"], tf().int32)


def _kept_tfds_ids(source: TfdsSource, fraction: float, seed: int) -> np.ndarray:
  """Class-balanced subset: one pass over labels, images left encoded."""
  ids, labels = [], []
  ds = source._read(source.train_split, add_tfds_id=True)  # pylint: disable=protected-access
  ds = ds.map(lambda ex: (ex["tfds_id"], ex[source.label_key])).batch(4096)
  for batch_ids, batch_labels in ds.as_numpy_iterator():
    ids.append(batch_ids)
    labels.append(batch_labels)
  ids = np.concatenate(ids)
  kept = subset_ids(np.arange(len(ids)), np.concatenate(labels), fraction, seed)
  return np.sort(ids[kept])


def tfds_source(data, image_size: int) -> TfdsSource:
  """Builds the source for a prepared TFDS dataset; never downloads unasked."""
  del image_size  # Images are resized per example by the pipeline.
  builder = _builder(data)
  image_key, label_key = _keys(builder)
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ModassemError(
        f"TFDS dataset {builder.name!r} has no {image_key!r}/{label_key!r} "
        "features: use an image classification dataset")
  train_split = str(data.get("train_split", "train") or "train")
  eval_split = str(data.get("eval_split", "") or "")
  if not eval_split:
    eval_split = "validation" if "validation" in builder.info.splits else "test"
  source = TfdsSource(
      name=f"tfds:{builder.name}",
      builder=builder,
      image_key=image_key,
      label_key=label_key,
      num_classes=int(features[label_key].num_classes),
      train_split=train_split,
      eval_split=eval_split,
      num_train=_num_examples(builder, train_split),
      num_eval=_num_examples(builder, eval_split))
  fraction = float(data.get("train_fraction", 1.0))
  if fraction != 1.0:
    keep = _kept_tfds_ids(source, fraction, int(data.get("subset_seed", 0)))
    source = dataclasses.replace(source, keep_ids=keep, num_train=len(keep))
  return source

