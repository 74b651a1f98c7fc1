"""Random-access image sources: the built-in digits set and image folders.

A source says how many examples each split has, orders them by id, and
turns ids into decoded uint8 images. The pipeline in `dataset.py` picks a
process's ids before anything is read, so skipped examples and other
processes' examples are never read or decoded.
"""

import dataclasses
import functools
import os
import re
from typing import Callable

import numpy as np

from modassem.data._tf import tf
from modassem.errors import ModassemError

# Fixed seed for data splits and train_fraction subsets: these must never
# depend on the run seed, or two runs would train on different data.
SPLIT_SEED = 20221208

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def subset_ids(ids: np.ndarray, labels: np.ndarray,
               fraction: float, seed: int = 0) -> np.ndarray:
  """Keeps `fraction` of each class of `ids` (at least one), in id order.

  `labels[i]` is the class of `ids[i]`. Deterministic for a given `seed`
  (`data.subset_seed`, kept apart from the run seed so that every phase of
  the method trains on the same subset).
  """
  if not 0.0 < fraction <= 1.0:
    raise ModassemError(
        f"data.train_fraction={fraction} is out of range: use a value in "
        "(0, 1], e.g. 0.1 to train on 10 % of each class")
  if fraction == 1.0:
    return ids
  rng = np.random.default_rng([SPLIT_SEED, int(seed)])
  keep = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = max(1, int(round(fraction * len(members))))
    keep.append(rng.permutation(members)[:n])
  return ids[np.sort(np.concatenate(keep))]


def epoch_order(ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """`ids` permuted from (seed, epoch) alone."""
  rng = np.random.default_rng([seed, epoch])
  return ids[rng.permutation(len(ids))]


class IdSplits:
  """What every random-access source shares: splits as arrays of example ids (`train_ids`, `eval_ids`), and an
  epoch as a permutation of the train ids. The pipeline reads the ids a process needs through `fetch`."""
  random_access = True

  @property
  def num_train(self) -> int:
    return len(self.train_ids)

  @property
  def num_eval(self) -> int:
    return len(self.eval_ids)

  def train_order(self, seed: int, epoch: int) -> np.ndarray:
    """All train ids in the epoch's order: a permutation from (seed, epoch)."""
    return epoch_order(self.train_ids, seed, epoch)

  def eval_order(self) -> np.ndarray:
    return self.eval_ids


@dataclasses.dataclass(frozen=True, eq=False)
class IndexedSource(IdSplits):
  """Examples addressed by id; an epoch is an exact permutation of ids.

  `load(id)` is a TF function returning a uint8 [H, W, 3] image for an int64
  id; `labels[id]` is its class. `train_ids`/`eval_ids` select the splits.
  The record `decode` receives is the id itself.
  """
  name: str
  num_classes: int
  labels: np.ndarray
  train_ids: np.ndarray
  eval_ids: np.ndarray
  load: Callable[..., "tf.Tensor"]
  # Digits are stored at the model resolution already: eval is a resize.
  eval_centre_crop: bool = True

  @functools.cached_property
  def _labels_tensor(self):
    # First used while tf.data traces a map function: create it eagerly so
    # later epochs (new traces) can capture the same tensor.
    with tf().init_scope():
      return tf().constant(self.labels, tf().int32)

  def fetch(self, ds):
    """(position, id) -> (position, record): the id is the record here."""
    return ds

  def decode(self, record):
    return self.load(record), tf().gather(self._labels_tensor, record)


def _fraction(data) -> float:
  return float(data.train_fraction)


def digits(data, image_size: int) -> IndexedSource:
  """scikit-learn's 8x8 digits (stored in modassem: `DIGITS_FILE`), upscaled in memory."""
  labels, images = _digits_arrays(image_size)
  train_ids, eval_ids = digits_split(labels)
  train_ids = subset_ids(train_ids, labels[train_ids], _fraction(data), int(data.subset_seed))

  # Captured once: the images stay in host memory as one tensor.
  images_tensor = tf().constant(images)

  def load(example_id):
    return tf().image.grayscale_to_rgb(tf().gather(images_tensor, example_id))

  return IndexedSource(
      name="digits", num_classes=10, labels=labels, train_ids=train_ids,
      eval_ids=eval_ids, load=load, eval_centre_crop=False)


# scikit-learn's copy of the UCI optical digits (CC BY 4.0), and its stratified 80/20 split (`train_test_split`,
# random_state=SPLIT_SEED), stored here: importing scikit-learn and SciPy to read 46 KB costs every process that
# trains on the digits almost two seconds. tests/test_data.py checks the file against scikit-learn.
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")


@functools.lru_cache(maxsize=1)
def _digits_file() -> dict:
  with np.load(DIGITS_FILE) as f:
    return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=2)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, uint8 images at `image_size`), read-only; kept for the next build in this process (the phases of a
  pipeline, the runs of a test session), since upscaling the set takes most of a second."""
  d = _digits_file()
  labels = d["labels"].astype(np.int32)
  images = _upscale_digits(d["images"], image_size)
  labels.flags.writeable = images.flags.writeable = False
  return labels, images


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Fixed stratified 80/20 split of the digits ids, independent of any run (scikit-learn's, as stored)."""
  is_eval = _digits_file()["is_eval"]
  if len(is_eval) != len(labels):
    raise ValueError(f"{len(labels)} digit labels, {len(is_eval)} in the stored split")
  ids = np.arange(len(labels))
  return ids[~is_eval], ids[is_eval]


def _upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
  """[N, 8, 8] values 0..16 -> uint8 [N, size, size, 1] via bicubic resize."""
  x = images.astype(np.float32)[..., None] * (255.0 / 16.0)
  # Grayscale is kept single-channel in memory (a third of the RGB size);
  # `load` expands to RGB per example.
  x = tf().image.resize(x, [size, size], method="bicubic").numpy()
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


# A file the decoder would fail on fails here first, with its path in the message (TF's decode error names no file,
# and libjpeg prints to stderr on a truncated JPEG): dataset.py turns BAD_IMAGE's assertion into a one-line error.
BAD_IMAGE = "modassem: not a whole image file:"
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_TAIL = 64   # bytes in which a JPEG's end-of-image marker (FF D9) or a PNG's IEND chunk must lie


def _contains(tail, marker: bytes):
  """Whether the bytes `marker` occur in `tail` (compared as bytes: TF's regexes want UTF-8 text)."""
  t = tf()
  b = t.io.decode_raw(tail, t.uint8)
  n = t.shape(b)[0] - len(marker) + 1
  hit = t.ones([t.maximum(n, 0)], t.bool)
  for i, value in enumerate(marker):
    hit = t.logical_and(hit, t.equal(b[i:i + t.maximum(n, 0)], value))
  return t.reduce_any(hit)


def checked_image_bytes(raw, path):
  """`raw` after an in-graph check that it starts like an image file and, for JPEG and PNG, ends like a whole one
  (a cut-off download or copy): a few byte comparisons per image, no decode."""
  t = tf()
  known = t.reduce_any(t.stack([t.strings.substr(raw, 0, len(sig)) == sig for sig in _SIGNATURES]))
  tail = t.strings.substr(raw, t.maximum(t.strings.length(raw) - _TAIL, 0), _TAIL)
  is_jpeg = t.strings.substr(raw, 0, 3) == _SIGNATURES[0]
  is_png = t.strings.substr(raw, 0, 8) == _SIGNATURES[1]
  whole = t.logical_and(t.logical_or(t.logical_not(is_jpeg), _contains(tail, b"\xff\xd9")),
                        t.logical_or(t.logical_not(is_png), _contains(tail, b"IEND")))
  check = t.debugging.Assert(t.logical_and(known, whole),
                             [BAD_IMAGE, path, t.where(known, "truncated", "not a JPEG/PNG/GIF/BMP file")])
  with t.control_dependencies([check]):
    return t.identity(raw)


def bad_image(error: Exception) -> str | None:
  """The one-line message for a `checked_image_bytes` failure raised by tf.data, else None."""
  # tf.debugging.Assert prints its data as "[BAD_IMAGE] [path] [why]".
  found = re.search(re.escape(BAD_IMAGE) + r"\]\s*\[(.*?)\]\s*\[(.*?)\]", str(error))
  if not found:
    return None
  path, why = found.group(1), found.group(2)
  return (f"image {path} (class {os.path.basename(os.path.dirname(path))!r}) cannot be decoded: {why}; remove or "
          "replace the file")


def _list_images(folder: str) -> list[str]:
  gfile = tf().io.gfile
  return sorted(
      name for name in gfile.listdir(folder)
      if name.lower().endswith(IMAGE_EXTENSIONS)
      and not gfile.isdir(os.path.join(folder, name)))


def _list_classes(split_dir: str) -> list[str]:
  gfile = tf().io.gfile
  return sorted(
      name.rstrip("/") for name in gfile.listdir(split_dir)
      if gfile.isdir(os.path.join(split_dir, name)))


def _scan_split(root: str, split: str,
                classes: list[str]) -> tuple[list[str], list[int]]:
  """Image paths and labels of root/split/<class>/*; errors name the gap."""
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, split, name)
    files = _list_images(class_dir)
    if not files:
      raise ModassemError(
          f"class folder {class_dir!r} has no images: add "
          f"{'/'.join(IMAGE_EXTENSIONS)} files or remove the folder")
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([label] * len(files))
  return paths, labels


def resolve_folder_eval_split(root: str, eval_split: str) -> str:
  """'' means val/ when it exists, else test/ (CIFAR-10 JPEG layout)."""
  gfile = tf().io.gfile
  if eval_split:
    if not gfile.isdir(os.path.join(root, eval_split)):
      raise ModassemError(
          f"eval split folder {os.path.join(root, eval_split)!r} does not "
          "exist: create it with the same <class>/ folders as the train "
          "split, or set --config.data.eval_split to an existing folder")
    return eval_split
  for candidate in ("val", "test"):
    if gfile.isdir(os.path.join(root, candidate)):
      return candidate
  raise ModassemError(
      f"data.path {root!r} has no val/ or test/ folder: add one with the "
      "same <class>/ folders as train/, or set --config.data.eval_split")


def folder(data, image_size: int) -> IndexedSource:
  """Images in root/<split>/<class>/*; classes are the train subfolders."""
  del image_size  # Images are resized per example by the pipeline.
  gfile = tf().io.gfile
  root = str(data.path or "")
  train_split = str(data.train_split or "train")
  if not root:
    raise ModassemError(
        "data.path is empty: point --config.data.path at a folder with "
        "train/<class>/* images")
  if not gfile.isdir(root):
    what = "is a file, not a folder" if gfile.exists(root) else "does not exist"
    raise ModassemError(
        f"data.path {root!r} {what}: point --config.data.path at a "
        "folder with train/<class>/* images")
  train_dir = os.path.join(root, train_split)
  if not gfile.isdir(train_dir):
    raise ModassemError(
        f"data.path {root!r} has no {train_split}/ folder: expected "
        f"{train_split}/<class>/* images (or set --config.data.train_split)")
  classes = _list_classes(train_dir)
  if not classes:
    raise ModassemError(
        f"{train_dir!r} has no class folders: put each class's images in "
        f"{train_dir}/<class_name>/")
  eval_split = resolve_folder_eval_split(
      root, str(data.eval_split or ""))
  eval_classes = _list_classes(os.path.join(root, eval_split))
  if eval_classes != classes:
    missing = sorted(set(classes) - set(eval_classes))
    extra = sorted(set(eval_classes) - set(classes))
    raise ModassemError(
        f"class folders of {eval_split}/ differ from {train_split}/ in "
        f"{root!r} (missing in {eval_split}: {missing[:5]}, extra: "
        f"{extra[:5]}): both splits need the same <class>/ folder names")
  train_paths, train_labels = _scan_split(root, train_split, classes)
  eval_paths, eval_labels = _scan_split(root, eval_split, classes)

  labels = np.asarray(train_labels + eval_labels, np.int32)
  train_ids = np.arange(len(train_paths))
  eval_ids = np.arange(len(train_paths), len(labels))
  train_ids = subset_ids(train_ids, labels[train_ids], _fraction(data), int(data.subset_seed))
  paths_tensor = tf().constant(train_paths + eval_paths)

  def load(example_id):
    path = tf().gather(paths_tensor, example_id)
    raw = checked_image_bytes(tf().io.read_file(path), path)
    image = tf().io.decode_image(raw, channels=3, expand_animations=False)
    return tf().ensure_shape(image, [None, None, 3])

  return IndexedSource(
      name=f"folder:{os.path.basename(os.path.normpath(root))}",
      num_classes=len(classes), labels=labels, train_ids=train_ids,
      eval_ids=eval_ids, load=load)
