"""TensorFlow Datasets sources (imagenet2012, cifar100, ...).

A dataset prepared in the ArrayRecord format (`tfds build --file_format=
array_record`; `tfds convert_format`, with apache-beam installed, converts a
copy already prepared) is read by
index: an epoch is an exact permutation of record indices from
(seed, epoch), like the other random-access sources, and each process reads
only the records of its own examples (`TfdsIndexedSource`).

A dataset in the TFRecord format (TFDS's default) can only be read in
sequence, so an epoch is not an exact permutation (`TfdsSource`). What is
deterministic, and what that source relies on:

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
import os

import numpy as np

from modassem.data._tf import graph_fn, tf
from modassem.data._tf import tfds
from modassem.data.sources import IdSplits, subset_ids
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
  name = str(data.tfds_name or "")
  if not name:
    raise ModassemError(
        "data.tfds_name is empty: set --config.data.tfds_name, e.g. "
        "imagenet2012 or cifar100")
  data_dir = str(data.tfds_data_dir or "") or None
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
  manual_dir = str(data.manual_dir or "")
  if not data.download:
    raise ModassemError(
        f"TFDS dataset {name!r} is not prepared in {where}: run `tfds build "
        f"{name} --data_dir=DIR --file_format=array_record` (imagenet2012 also needs "
        "--manual_dir=DIR_WITH_THE_IMAGENET_TARS) and pass "
        "--config.data.tfds_data_dir=DIR, or set --config.data.download=True")
  config = tfds().download.DownloadConfig(manual_dir=manual_dir or None)
  # ArrayRecord: read by index, each process only its share (module doc).
  builder = tfds().builder(name, data_dir=data_dir, file_format="array_record")
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


# Records fetched by one call into the ArrayRecord reader.
FETCH_CHUNK = 32


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsIndexedSource(IdSplits):
  """A TFDS dataset in ArrayRecord files, read by record index.

  Ids: train record i is id i, eval record j is id `num_train_records` + j.
  A record is the serialized example, read by `fetch` in chunks through
  TFDS's ArrayRecord data sources and parsed in the tf.data pipeline.
  """
  name: str
  features: object
  image_key: str
  label_key: str
  num_classes: int
  train_reader: object
  eval_reader: object
  train_ids: np.ndarray
  eval_ids: np.ndarray
  eval_centre_crop: bool = True

  def read(self, ids: np.ndarray) -> np.ndarray:
    """Serialized examples of `ids` (one split per call, as `fetch` chunks)."""
    first = len(self.train_reader)
    ids = ids.tolist()
    if ids and ids[0] >= first:
      records = self.eval_reader.__getitems__([i - first for i in ids])
    else:
      records = self.train_reader.__getitems__(ids)
    return np.array(records, dtype=object)

  def fetch(self, ds):
    """(position, id) -> (position, serialized example)."""
    t = tf()
    # A Python call per chunk, not per record; the split boundary never
    # falls inside a chunk because train and eval pipelines are separate.
    def chunk(positions, ids):
      return positions, t.numpy_function(self.read, [ids], t.string,
                                         stateful=False)
    return ds.batch(FETCH_CHUNK).map(
        graph_fn(chunk), num_parallel_calls=t.data.AUTOTUNE).unbatch()

  def decode(self, record):
    ex = self.features.deserialize_example(
        record, decoders={self.image_key: tfds().decode.SkipDecoding()})
    image = tf().io.decode_image(
        ex[self.image_key], channels=3, expand_animations=False)
    image = tf().ensure_shape(image, [None, None, 3])
    return image, tf().cast(ex[self.label_key], tf().int32)

  def labels(self, ids: np.ndarray) -> np.ndarray:
    """Labels of `ids`, images left encoded (for train_fraction)."""
    t = tf()
    ds = self.fetch(t.data.Dataset.from_tensor_slices(
        (ids.astype(np.int64), ids.astype(np.int64))))
    ds = ds.map(graph_fn(lambda _, r: self.features.deserialize_example(
        r, decoders={self.image_key: tfds().decode.SkipDecoding()}
    )[self.label_key]), num_parallel_calls=t.data.AUTOTUNE).batch(4096)
    return np.concatenate(list(ds.as_numpy_iterator()) or [np.zeros(0)])


def random_access(builder) -> bool:
  """Whether the prepared copy can be read by index (ArrayRecord files)."""
  formats = builder.info.available_file_formats()
  return tfds().core.file_adapters.FileFormat.ARRAY_RECORD in formats


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
  random_access = False

  def record_files(self, which: str) -> list[str]:
    """The TFRecord files of the train or eval split, for naming a corrupt one."""
    split = self.train_split if which == "train" else self.eval_split
    info = self.builder.info.splits[split]
    return [os.path.join(self.builder.data_dir, name) for name in info.filenames]

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
      ds = ds.filter(graph_fn(lambda ex: table.lookup(ex["tfds_id"]) > 0))
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=buffer_seed,
                    reshuffle_each_iteration=False)
    return ds.map(graph_fn(self._record))

  def eval_records(self):
    return self._read(self.eval_split).map(graph_fn(self._record))

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
  ds = ds.map(graph_fn(lambda ex: (ex["tfds_id"], ex[source.label_key]))).batch(4096)
  for batch_ids, batch_labels in ds.as_numpy_iterator():
    ids.append(batch_ids)
    labels.append(batch_labels)
  ids = np.concatenate(ids)
  kept = subset_ids(np.arange(len(ids)), np.concatenate(labels), fraction, seed)
  return np.sort(ids[kept])


def _indexed(builder, name, image_key, label_key, train_split, eval_split,
             data) -> TfdsIndexedSource:
  def reader(split):
    return builder.as_data_source(
        split, file_format="array_record",
        deserialize_method=tfds().decode.DeserializeMethod.RAW_BYTES)
  train_reader, eval_reader = reader(train_split), reader(eval_split)
  num_train = len(train_reader)
  source = TfdsIndexedSource(
      name=name, features=builder.info.features, image_key=image_key,
      label_key=label_key,
      num_classes=int(builder.info.features[label_key].num_classes),
      train_reader=train_reader, eval_reader=eval_reader,
      train_ids=np.arange(num_train),
      eval_ids=num_train + np.arange(len(eval_reader)))
  fraction = float(data.train_fraction)
  if fraction != 1.0:
    keep = subset_ids(source.train_ids, source.labels(source.train_ids),
                      fraction, int(data.subset_seed))
    source = dataclasses.replace(source, train_ids=keep)
  return source


def tfds_source(data, image_size: int) -> TfdsSource | TfdsIndexedSource:
  """Builds the source for a prepared TFDS dataset; never downloads unasked.

  ArrayRecord copies are read by index; TFRecord copies are streamed.
  """
  del image_size  # Images are resized per example by the pipeline.
  builder = _builder(data)
  image_key, label_key = _keys(builder)
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ModassemError(
        f"TFDS dataset {builder.name!r} has no {image_key!r}/{label_key!r} "
        "features: use an image classification dataset")
  train_split = str(data.train_split or "train")
  eval_split = str(data.eval_split or "")
  if not eval_split:
    eval_split = "validation" if "validation" in builder.info.splits else "test"
  num_train = _num_examples(builder, train_split)
  num_eval = _num_examples(builder, eval_split)
  name = f"tfds:{builder.name}"
  if random_access(builder):
    return _indexed(builder, name, image_key, label_key, train_split,
                    eval_split, data)
  source = TfdsSource(
      name=name,
      builder=builder,
      image_key=image_key,
      label_key=label_key,
      num_classes=int(features[label_key].num_classes),
      train_split=train_split,
      eval_split=eval_split,
      num_train=num_train,
      num_eval=num_eval)
  fraction = float(data.train_fraction)
  if fraction != 1.0:
    keep = _kept_tfds_ids(source, fraction, int(data.subset_seed))
    source = dataclasses.replace(source, keep_ids=keep, num_train=len(keep))
  return source
