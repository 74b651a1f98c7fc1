"""Tests of modassem.data: digits, image folders, TFDS, determinism, sharding."""

import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

from modassem import data as data_lib
from modassem.data import sources
from modassem.errors import ModassemError

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MEAN = np.array(data_lib.default_config().mean, np.float32)
STD = np.array(data_lib.default_config().std, np.float32)


def _config(**overrides):
  config = data_lib.default_config()
  # These tests pin down crops, order and decoding exactly; the recipe's
  # extras (RandAugment, erasing, repeats) are tested in test_augment.py.
  config.update(dict(randaugment="", random_erase=0.0, repeated_aug=1))
  config.update(overrides)
  return config


def _pixels(image):
  """Undoes normalisation: back to 0..1 RGB."""
  return image * STD + MEAN


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def digits():
  return data_lib.build(_config(), image_size=16)


@pytest.fixture(scope="module")
def digits_plain():
  return data_lib.build(_config(augment="none"), image_size=16)


def test_import_does_not_load_tensorflow():
  code = ("import sys, modassem.data; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_digits_shapes_dtypes_and_normalisation(digits):
  assert (digits.num_classes, digits.image_size) == (10, 16)
  assert digits.num_train + digits.num_eval == 1797
  batch = next(digits.train_batches(32, seed=0))
  assert batch["image"].shape == (32, 16, 16, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < 10
  pixels = _pixels(batch["image"])
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  # Grayscale source: all three channels carry the same value.
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
  # Digits are white strokes on black: both extremes occur.
  assert pixels.min() < 0.05 and pixels.max() > 0.9

  eval_batch = next(digits.eval_batches(50))
  assert eval_batch["image"].shape == (50, 16, 16, 3)
  assert eval_batch["mask"].dtype == np.float32


def test_the_stored_digits_are_scikit_learns_with_its_stratified_split():
  """modassem/data/digits.npz holds scikit-learn's digits and its `train_test_split` of them (stratified, 20 %
  held out, random_state=SPLIT_SEED), so that training on the digits needs no scikit-learn."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  stored = np.load(sources.DIGITS_FILE)
  np.testing.assert_array_equal(stored["images"], bunch.images)
  np.testing.assert_array_equal(stored["labels"], bunch.target)
  train_ids, eval_ids = model_selection.train_test_split(np.arange(1797), test_size=0.2, stratify=bunch.target,
                                                         random_state=sources.SPLIT_SEED)
  ours = sources.digits_split(bunch.target)
  np.testing.assert_array_equal(ours[0], np.sort(train_ids))
  np.testing.assert_array_equal(ours[1], np.sort(eval_ids))


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
  labels = digits.source.labels
  train_ids, eval_ids = sources.digits_split(labels)
  assert not set(train_ids) & set(eval_ids)
  assert len(train_ids) + len(eval_ids) == len(labels) == 1797
  np.testing.assert_array_equal(digits.source.train_ids, train_ids)
  np.testing.assert_array_equal(digits.source.eval_ids, eval_ids)
  for c in range(10):
    share = np.mean(labels[eval_ids] == c) / np.mean(labels == c)
    assert 0.9 < share < 1.1
  # The eval batches hold exactly the held-out examples, in id order.
  eval_labels = np.concatenate(
      [b["label"][b["mask"] > 0] for b in digits.eval_batches(100)])
  np.testing.assert_array_equal(eval_labels, labels[eval_ids])


def test_epoch_orders_are_seeded_permutations(digits):
  source = digits.source
  orders = [source.train_order(seed, epoch)
            for seed, epoch in ((0, 0), (0, 1), (1, 0), (0, 0))]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), source.train_ids)
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[0], orders[2])
  np.testing.assert_array_equal(orders[0], orders[3])


def test_augmentation_changes_images_but_not_order(digits, digits_plain):
  augmented = next(digits.train_batches(64, seed=3))
  plain = next(digits_plain.train_batches(64, seed=3))
  np.testing.assert_array_equal(augmented["label"], plain["label"])
  assert augmented["image"].shape == plain["image"].shape
  differs = np.abs(augmented["image"] - plain["image"]).max(axis=(1, 2, 3))
  assert np.mean(differs > 0.1) > 0.5


def test_train_transform_is_a_pure_function_of_its_seed():
  from modassem.data import augment  # pylint: disable=g-import-not-at-top
  from modassem.data._tf import tf  # pylint: disable=g-import-not-at-top
  image = tf().constant(
      np.random.default_rng(0).integers(0, 256, (20, 28, 3)), tf().uint8)
  crop = augment.inception_crop(12, area_min=0.08)
  outputs = [crop(image, tf().constant(s, tf().int64)).numpy()
             for s in ([1, 2], [1, 2], [1, 3])]
  assert outputs[0].shape == (12, 12, 3)
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert not np.array_equal(outputs[0], outputs[2])


def test_resume_matches_uninterrupted_run_across_epochs(digits):
  steps = digits.steps_per_epoch(64)
  assert steps == 1437 // 64
  full = _take(digits.train_batches(64, seed=7), steps + 3)
  start = steps - 2
  resumed = _take(digits.train_batches(64, seed=7, start_step=start), 5)
  _assert_batches_equal(resumed, full[start:])
  other_seed = next(digits.train_batches(64, seed=8))
  assert not np.array_equal(other_seed["label"], full[0]["label"])


def test_process_shards_concatenate_to_global_batch(digits):
  steps = digits.steps_per_epoch(64)
  start = steps - 1  # The second batch is in the next epoch.
  global_batches = _take(digits.train_batches(64, seed=5, start_step=start), 2)
  shards = [
      _take(digits.train_batches(64, seed=5, start_step=start,
                                 process_index=p, process_count=4), 2)
      for p in range(4)]
  for step, expected in enumerate(global_batches):
    assert shards[0][step]["image"].shape == (16, 16, 16, 3)
    joined = {key: np.concatenate([s[step][key] for s in shards])
              for key in expected}
    _assert_batches_equal([joined], [expected])


def test_eval_visits_each_example_once_with_mask(digits):
  n = digits.num_eval  # 360: two global batches of 256, the last padded.
  single = list(digits.eval_batches(256))
  assert len(single) == 2
  mask = np.concatenate([b["mask"] for b in single])
  np.testing.assert_array_equal(mask, np.arange(512) < n)
  assert np.all(np.concatenate([b["image"] for b in single])[n:] == 0)

  shards = [list(digits.eval_batches(256, process_index=p, process_count=2))
            for p in range(2)]
  assert [len(s) for s in shards] == [2, 2]
  for step in range(2):
    for key in ("image", "label", "mask"):
      joined = np.concatenate([s[step][key] for s in shards])
      np.testing.assert_array_equal(joined, single[step][key])


def test_batch_size_errors(digits):
  with pytest.raises(ModassemError, match="divisible"):
    digits.train_batches(30, seed=0, process_count=4)
  with pytest.raises(ModassemError, match="train examples"):
    digits.train_batches(4096, seed=0)
  with pytest.raises(ModassemError, match="divisible"):
    digits.eval_batches(30, process_count=4)


def test_train_fraction_keeps_each_class_balanced():
  full = data_lib.build(_config(augment="none"), image_size=8)
  part = data_lib.build(_config(augment="none", train_fraction=0.25), 8)
  again = data_lib.build(_config(augment="none", train_fraction=0.25), 8)
  labels = full.source.labels
  np.testing.assert_array_equal(part.source.train_ids, again.source.train_ids)
  assert set(part.source.train_ids) <= set(full.source.train_ids)
  assert part.num_eval == full.num_eval
  full_counts = np.bincount(labels[full.source.train_ids], minlength=10)
  part_counts = np.bincount(labels[part.source.train_ids], minlength=10)
  np.testing.assert_array_equal(part_counts, np.round(full_counts * 0.25))
  assert part.num_train == part_counts.sum()
  # Another subset seed: another subset of the same per-class sizes.
  other = data_lib.build(_config(augment="none", train_fraction=0.25, subset_seed=1), 8)
  assert set(other.source.train_ids) != set(part.source.train_ids)
  np.testing.assert_array_equal(np.bincount(labels[other.source.train_ids], minlength=10), part_counts)
  with pytest.raises(ModassemError, match="train_fraction"):
    data_lib.build(_config(train_fraction=0.0), 8)


# Image folders ---------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def _write(path, colour, size, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path, format=fmt)


def _make_folder(root, eval_split="val"):
  """Solid-colour images per class, of several sizes and formats."""
  for name, colour in COLOURS.items():
    for i, size in enumerate([(20, 30), (31, 17), (24, 24), (40, 12)]):
      _write(root / "train" / name / f"{i}.png", colour, size)
    _write(root / eval_split / name / "a.PNG", colour, (18, 26), "PNG")
    _write(root / eval_split / name / "b.bmp", colour, (33, 21), "BMP")
  _write(root / "train" / "cat" / "x.JPG", COLOURS["cat"], (25, 25), "JPEG")
  _write(root / "train" / "dog" / "y.gif", COLOURS["dog"], (25, 25), "GIF")
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  return root


def test_folder_source_reads_classes_and_images(tmp_path):
  root = _make_folder(tmp_path / "imgs")
  ds = data_lib.build(_config(name="folder", path=str(root)), image_size=16)
  assert (ds.num_classes, ds.num_train, ds.num_eval) == (3, 14, 6)
  batch = next(ds.train_batches(7, seed=0))
  assert batch["image"].shape == (7, 16, 16, 3)
  eval_batches = list(ds.eval_batches(4))
  labels = np.concatenate([b["label"] for b in eval_batches])
  mask = np.concatenate([b["mask"] for b in eval_batches])
  images = np.concatenate([b["image"] for b in eval_batches])
  np.testing.assert_array_equal(labels[mask > 0], [0, 0, 1, 1, 2, 2])
  expected = np.array([COLOURS[c] for c in ("cat", "cat", "dog", "dog",
                                            "emu", "emu")]) / 255.0
  np.testing.assert_allclose(
      _pixels(images[:6]).mean(axis=(1, 2)), expected, atol=0.01)
  # Train crops of a solid image keep its colour: decode is right too.
  pixels = _pixels(batch["image"]).mean(axis=(1, 2))
  for label, rgb in zip(batch["label"], pixels):
    colour = list(COLOURS.values())[label]
    np.testing.assert_allclose(rgb, np.array(colour) / 255.0, atol=0.03)
  # Without val/, test/ is the eval split (the CIFAR-10 JPEG layout).
  root = _make_folder(tmp_path / "cifar_like", eval_split="test")
  assert data_lib.build(_config(name="folder", path=str(root)), 8).num_eval == 6


def _error(config):
  with pytest.raises(ModassemError) as info:
    data_lib.build(config, image_size=8)
  message = str(info.value)
  assert "\n" not in message and ": " in message
  return message


def test_folder_errors_are_one_line_and_helpful(tmp_path):
  missing = tmp_path / "nowhere"
  message = _error(_config(name="folder", path=str(missing)))
  assert str(missing) in message and "does not exist" in message

  assert "data.path is empty" in _error(_config(name="folder", path=""))

  (tmp_path / "empty").mkdir()
  message = _error(_config(name="folder", path=str(tmp_path / "empty")))
  assert "no train/ folder" in message

  (tmp_path / "noclass" / "train").mkdir(parents=True)
  message = _error(_config(name="folder", path=str(tmp_path / "noclass")))
  assert "no class folders" in message

  root = _make_folder(tmp_path / "noimages")
  (root / "train" / "fox").mkdir()
  (root / "val" / "fox").mkdir()
  (root / "train" / "fox" / "readme.txt").write_text("x")
  message = _error(_config(name="folder", path=str(root)))
  assert "fox" in message and "has no images" in message

  root = _make_folder(tmp_path / "mismatch")
  _write(root / "val" / "owl" / "a.png", (1, 2, 3), (8, 8))
  message = _error(_config(name="folder", path=str(root)))
  assert "owl" in message and "same <class>/ folder names" in message

  root = _make_folder(tmp_path / "noeval")
  for path in sorted((root / "val").rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  (root / "val").rmdir()
  message = _error(_config(name="folder", path=str(root)))
  assert "no val/ or test/ folder" in message
  message = _error(_config(name="folder", path=str(root), eval_split="dev"))
  assert "dev" in message and "does not exist" in message


def _extract_cifar(dest, classes=("bird", "dog"), per_split=5):
  """Extracts the first few JPEGs of each class and split from the tarball."""
  wanted = {(s, c): per_split for s in ("train", "test") for c in classes}
  with tarfile.open(CIFAR_JPEG) as tar:
    for member in tar:
      key = tuple(member.name.split("/")[:2])
      if member.isfile() and wanted.get(key, 0) > 0:
        tar.extract(member, dest, filter="data")
        wanted[key] -= 1
        if not any(wanted.values()):
          break
  assert not any(wanted.values()), f"tarball lacks files: {wanted}"


def test_folder_source_on_cifar10_jpegs(tmp_path):
  if not CIFAR_JPEG.exists():
    reason = (f"{CIFAR_JPEG} is absent: put the CIFAR-10 JPEG tarball "
              "(train/<class>/*.jpg, test/<class>/*.jpg) at "
              "../shared/data/ beside the repo")
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)
  _extract_cifar(tmp_path)
  ds = data_lib.build(_config(name="folder", path=str(tmp_path)), 32)
  assert (ds.num_classes, ds.num_train, ds.num_eval) == (2, 10, 10)
  batch = next(ds.train_batches(10, seed=0))
  assert batch["image"].shape == (10, 32, 32, 3)
  assert sorted(batch["label"].tolist()) == [0] * 5 + [1] * 5
  eval_batches = list(ds.eval_batches(8))
  mask = np.concatenate([b["mask"] for b in eval_batches])
  labels = np.concatenate([b["label"] for b in eval_batches])
  np.testing.assert_array_equal(mask, np.arange(16) < 10)
  np.testing.assert_array_equal(labels[:10], [0] * 5 + [1] * 5)
  pixels = _pixels(np.concatenate([b["image"] for b in eval_batches])[:10])
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  # Real photographs: varied content, not blank decodes.
  assert pixels.std(axis=(1, 2, 3)).min() > 0.02


# TFDS ------------------------------------------------------------------------

TFDS_NAME = "modassem_tiny_images"


@pytest.fixture(scope="module", params=["tfrecord", "array_record"])
def tfds_dir(request, tmp_path_factory):
  """A real TFDS dataset written locally, streamed (TFRecord) or read by
  index (ArrayRecord); image value i*6 encodes example i."""
  from reads import write_tiny_tfds  # pylint: disable=g-import-not-at-top
  return write_tiny_tfds(str(tmp_path_factory.mktemp("tfds") / request.param), request.param)


def _ids(images):
  """Recovers example ids from the constant image values."""
  return np.round(_pixels(images)[:, 0, 0, 0] * 255 / 6).astype(int)


def test_tfds_source_reads_prepared_dataset(tfds_dir):
  config = _config(name="tfds", tfds_name=TFDS_NAME, tfds_data_dir=tfds_dir,
                   augment="none")
  ds = data_lib.build(config, image_size=8)
  assert (ds.num_classes, ds.num_train, ds.num_eval) == (3, 30, 7)
  assert ds.source.random_access == tfds_dir.endswith("array_record")

  full = _take(ds.train_batches(10, seed=2), 7)
  for epoch in range(2):
    ids = np.concatenate([_ids(b["image"]) for b in full[3 * epoch:][:3]])
    assert sorted(ids.tolist()) == list(range(30))
    labels = np.concatenate([b["label"] for b in full[3 * epoch:][:3]])
    np.testing.assert_array_equal(labels, ids % 3)
  assert not np.array_equal(_ids(full[0]["image"]), _ids(full[3]["image"]))
  _assert_batches_equal(_take(ds.train_batches(10, seed=2, start_step=2), 5),
                        full[2:])
  shards = [next(ds.train_batches(10, seed=2, start_step=2, process_index=p,
                                  process_count=2)) for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([s["image"] for s in shards]), full[2]["image"])

  eval_batches = list(ds.eval_batches(4))
  mask = np.concatenate([b["mask"] for b in eval_batches])
  ids = _ids(np.concatenate([b["image"] for b in eval_batches]))[mask > 0]
  np.testing.assert_array_equal(mask, np.arange(8) < 7)
  assert sorted(ids.tolist()) == list(range(30, 37))


def test_tfds_train_fraction_is_class_balanced(tfds_dir):
  config = _config(name="tfds", tfds_name=TFDS_NAME, tfds_data_dir=tfds_dir,
                   augment="none", train_fraction=0.4)
  ds = data_lib.build(config, image_size=8)
  assert ds.num_train == 12
  ids = np.concatenate(
      [_ids(b["image"]) for b in _take(ds.train_batches(4, seed=0), 3)])
  assert len(set(ids.tolist())) == 12
  np.testing.assert_array_equal(np.bincount(ids % 3), [4, 4, 4])


def test_tfds_errors(tmp_path):
  message = _error(_config(name="tfds", tfds_name="mnist",
                           tfds_data_dir=str(tmp_path)))
  assert "not prepared" in message and "tfds build mnist" in message
  message = _error(_config(name="tfds", tfds_name="no_such_dataset_xyz",
                           tfds_data_dir=str(tmp_path)))
  assert "no_such_dataset_xyz" in message and len(message) < 300
  assert "tfds_name is empty" in _error(_config(name="tfds"))


def test_config_errors():
  assert "data.name" in _error(_config(name="imagenet"))
  assert "data.augment" in _error(_config(augment="randaugment"))


def test_a_corrupt_tfrecord_file_is_one_error_naming_it(tmp_path):
  """64 bytes zeroed in the middle of the train split's TFRecord file: TF's DataLossError names no file; the
  error names it, and says to prepare the dataset again."""
  from reads import write_tiny_tfds  # pylint: disable=g-import-not-at-top
  root = write_tiny_tfds(str(tmp_path / "tfds"), "tfrecord")
  train_file, = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "-train.tfrecord" in f]
  with open(train_file, "r+b") as f:
    f.seek(os.path.getsize(train_file) // 2)
    f.write(b"\0" * 64)
  ds = data_lib.build(_config(name="tfds", tfds_name=TFDS_NAME, tfds_data_dir=root, augment="none"), image_size=8)
  with pytest.raises(ModassemError) as e:
    _take(ds.train_batches(10, seed=2), 3)
  message = str(e.value)
  assert message.startswith(f"the TFRecord file {train_file} is damaged (corrupted record at ")
  assert "prepare the dataset again" in message and "\n" not in message


def test_the_corrupt_file_among_several_is_found_by_reading_them(tmp_path):
  """With more than one file in a split, the first one whose records do not read back whole is named."""
  from modassem.data import dataset  # pylint: disable=g-import-not-at-top
  from modassem.data._tf import tf  # pylint: disable=g-import-not-at-top
  paths = [str(tmp_path / f"train.tfrecord-{i:05d}-of-00003") for i in range(3)]
  for path in paths:
    with tf().io.TFRecordWriter(path) as w:
      for j in range(20):
        w.write(bytes([j]) * 100)
  assert dataset._corrupt_file(paths) == f"a TFRecord file of the 3 in {tmp_path}"   # all whole: the folder
  with open(paths[1], "r+b") as f:
    f.seek(1000)
    f.write(b"\xff" * 8)
  assert dataset._corrupt_file(paths) == f"the TFRecord file {paths[1]}"


def test_tensorflows_start_up_notices_are_left_out_and_all_else_written_back(capfd, monkeypatch):
  """TensorFlow imports with its start-up notices (which TF_CPP_MIN_LOG_LEVEL no longer reaches) left out of the
  process's stderr; whatever else lands there meanwhile is written back in order, also where the block raises. At
  TF_CPP_MIN_LOG_LEVEL=0, all of TensorFlow's log asked for, nothing is left out."""
  from modassem.data import _tf  # pylint: disable=g-import-not-at-top
  notices = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"I0000 00:00:1796499534.920607   27100 port.cc:153] oneDNN custom operations are on. You may see "
             b"slightly different numerical results\n")
  others = b"E0000 00:00:1796499534.920607   27100 loader.cc:1] a library that did not load\na warning\n"
  for level, shown in (("3", others), ("0", notices + others)):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with pytest.raises(ImportError, match="a failed import"):
      with _tf._start_up_notices_left_out():  # pylint: disable=protected-access
        os.write(2, notices[:40])   # in pieces, as C++ may write a line
        os.write(2, notices[40:] + others)
        raise ImportError("a failed import")
    assert capfd.readouterr().err == shown.decode(), level
