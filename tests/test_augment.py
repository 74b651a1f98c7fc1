"""Tests of the training recipe's augmentations: RandAugment, random erasing,
repeated augmentation and the CIFAR crop."""

import io
import os
import pathlib
import tarfile

import numpy as np
from PIL import Image
import pytest

from modassem import data as data_lib
from modassem.data import augment
from modassem.data import dataset as dataset_lib
from modassem.data import randaugment as ra
from modassem.data._tf import tf
from modassem.errors import ModassemError

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
FILL = (124, 116, 104)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
          "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing"}


def _seed(*values):
  return tf().constant(values, tf().int64)


def _synthetic():
  """A 32 px gradient (not spanning 0..255) with a bright square: every op
  has edges, levels and range to act on."""
  y, x = np.mgrid[0:32, 0:32]
  image = np.stack([40 + x * 5, 40 + y * 5, 60 + (x + y) * 2], -1)
  image[10:18, 12:20] = (230, 220, 30)
  return image.astype(np.uint8)


def _real():
  """The first CIFAR-10 training JPEG of the shared tarball, decoded."""
  if not CIFAR_JPEG.exists():
    reason = (f"{CIFAR_JPEG} is absent: put the CIFAR-10 JPEG tarball at "
              "../shared/data/ beside the repo")
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)
  with tarfile.open(CIFAR_JPEG) as tar:
    for member in tar:
      if member.isfile() and member.name.lower().endswith(".jpg"):
        raw = tar.extractfile(member).read()
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
  pytest.fail(f"{CIFAR_JPEG} holds no JPEG")


@pytest.fixture(params=["synthetic", "real"], scope="module")
def image(request):
  return _synthetic() if request.param == "synthetic" else _real()


def _is_identity(name, image):
  """Ops that legitimately leave this image alone at magnitude 9."""
  if name == "AutoContrast":
    # Already stretched: every channel spans 0..255.
    return bool(np.all(image.min((0, 1)) == 0) and
                np.all(image.max((0, 1)) == 255))
  return False


@pytest.mark.parametrize("name", ra.INCREASING_OPS)
def test_each_op_changes_the_image_within_range(name, image):
  out = ra.apply_op(image, name, 9.0, False, FILL).numpy()
  assert out.shape == image.shape and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255
  np.testing.assert_array_equal(out, np.round(out))  # uint8 grid, as PIL.
  changed = np.abs(out - image).max() > 0
  assert changed != _is_identity(name, image)
  if name in SIGNED:
    other = ra.apply_op(image, name, 9.0, True, FILL).numpy()
    assert not np.array_equal(out, other), "sign has no effect"


def test_geometric_ops_fill_with_the_mean_colour():
  image = np.full((32, 32, 3), 255, np.uint8)
  out = ra.apply_op(image, "TranslateXRel", 10.0, False, FILL).numpy()
  # 45 % of the width moved out on the right: mean colour comes in.
  np.testing.assert_array_equal(out[:, -5], np.broadcast_to(FILL, (32, 3)))
  np.testing.assert_array_equal(out[:, :5], 255)


def test_level_zero_is_identity_for_increasing_blends():
  image = _synthetic()
  for name in ("ColorIncreasing", "ContrastIncreasing", "Rotate", "ShearX",
               "SolarizeIncreasing"):
    out = ra.apply_op(image, name, 0.0, False, FILL).numpy()
    np.testing.assert_array_equal(out, image, err_msg=name)


def test_parse_policy_strings():
  policy = ra.parse("rand-m9-mstd0.5-inc1")
  assert (policy.magnitude, policy.num_ops, policy.magnitude_std,
          policy.increasing, policy.prob) == (9.0, 2, 0.5, True, 0.5)
  assert policy.ops == ra.INCREASING_OPS and len(policy.ops) == 15
  other = ra.parse("rand-n3-m5-mmax12-p1")
  assert (other.num_ops, other.magnitude, other.magnitude_max,
          other.increasing, other.prob) == (3, 5.0, 12.0, False, 1.0)
  for bad in ("auto-m9", "rand-x9", "rand-m", "rand-n0", "rand-p2"):
    with pytest.raises(ModassemError, match="data.randaugment"):
      ra.parse(bad)


def test_rand_augment_is_a_pure_function_of_its_seed():
  image = tf().constant(_real() if CIFAR_JPEG.exists() else _synthetic())
  fn = ra.rand_augment(ra.parse("rand-m9-mstd0.5-inc1"), FILL)
  outputs = [fn(image, _seed(4, s)).numpy() for s in range(40)]
  np.testing.assert_array_equal(outputs[0], fn(image, _seed(4, 0)).numpy())
  distinct = {o.tobytes() for o in outputs}
  assert len(distinct) > 25
  # Each of the 2 ops is skipped with p = 0.5: about 1 in 4 images is
  # untouched (a little more: some ops can be identity on an image).
  untouched = np.mean([np.array_equal(o, image.numpy()) for o in outputs])
  assert 0.05 < untouched < 0.5
  for o in outputs:
    assert o.shape == image.shape and 0 <= o.min() and o.max() <= 255


# Random erasing --------------------------------------------------------------


def test_random_erasing_replaces_one_box_at_rate_p():
  size, trials = 48, 300
  image = tf().fill([size, size, 3], 7.0)
  erase = tf().function(augment.random_erasing(0.25))
  fractions = []
  for s in range(trials):
    out = erase(image, _seed(9, s)).numpy()
    np.testing.assert_array_equal(out, erase(image, _seed(9, s)).numpy())
    mask = (out != 7.0).any(-1)
    if not mask.any():
      continue
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    np.testing.assert_array_equal(mask, box)  # One solid rectangle.
    h, w = len(rows), len(cols)
    assert 0.3 / 1.5 <= h / w <= 3.3 * 1.5
    fractions.append(h * w / size**2)
    # Per-pixel noise: N(0, 1), not a constant colour.
    noise = out[mask]
    assert noise.std() > 0.5 and abs(noise.mean()) < 0.5
  rate = len(fractions) / trials
  assert 0.18 < rate < 0.32, rate  # p = 0.25, binomial sd 0.025.
  # Area fraction in (0.02, 1/3), allowing for rounding of h and w.
  assert min(fractions) >= 0.015 and max(fractions) <= 0.36
  assert min(fractions) < 0.1 and max(fractions) > 0.2


def test_random_erasing_runs_after_normalisation():
  config = _digits_config(augment="inception", randaugment="",
                          random_erase=1.0, repeated_aug=1)
  ds = data_lib.build(config, image_size=16)
  images = next(ds.train_batches(16, seed=0))["image"]
  mean = np.array(config.mean, np.float32)
  std = np.array(config.std, np.float32)
  # Noise lies outside the 0..1 pixel range after un-normalising: it was
  # written in normalised units, as timm does.
  pixels = images * std + mean
  assert (pixels < -0.1).any() and (pixels > 1.1).any()


# Repeated augmentation and the pipeline -------------------------------------


def _digits_config(**overrides):
  config = data_lib.default_config()
  config.update(overrides)
  return config


def test_repeat_records_is_rasampler_order():
  records = tf().data.Dataset.range(10)
  assert list(dataset_lib.repeat_records(records, 10, 3).as_numpy_iterator()) \
      == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
  assert list(dataset_lib.repeat_records(records, 10, 1)) == list(records)
  # The random-access sources' order: the same list, computed on ids.
  order = np.arange(10)[::-1]
  assert dataset_lib.repeat_ids(order, 10, 3).tolist() \
      == [9, 9, 9, 8, 8, 8, 7, 7, 7, 6]
  assert dataset_lib.repeat_ids(order, 10, 1) is order
  assert dataset_lib.repeat_ids(order, 7, 2).tolist() == [9, 9, 8, 8, 7, 7, 6]
  # Dict records (the TFDS source) repeat field by field.
  dicts = tf().data.Dataset.from_tensor_slices({"a": [1, 2], "b": [3, 4]})
  out = list(dataset_lib.repeat_records(dicts, 2, 2).as_numpy_iterator())
  assert [(d["a"], d["b"]) for d in out] == [(1, 3), (1, 3)]


def test_each_chosen_image_appears_three_times_per_epoch():
  ds = data_lib.build(_digits_config(), image_size=16)
  assert ds.repeats == 3 and ds.num_train == 1437
  for epoch in range(2):
    order = ds.source.train_order(11, epoch)
    repeated = dataset_lib.repeat_ids(order, ds.num_train, ds.repeats)
    assert len(repeated) == ds.num_train  # Epoch length unchanged.
    ids, counts = np.unique(repeated, return_counts=True)
    assert set(counts) == {3}
    np.testing.assert_array_equal(np.sort(ids), np.sort(order[:479]))


def test_copies_get_different_augmentations_and_resume_is_pure():
  ds = data_lib.build(_digits_config(train_fraction=0.1), image_size=16)
  assert ds.after_normalize is not None and ds.repeats == 3
  steps = ds.steps_per_epoch(24)
  full = [next_batch for _, next_batch in
          zip(range(steps + 2), ds.train_batches(24, seed=7))]
  labels = full[0]["label"].reshape(8, 3)
  assert (labels == labels[:, :1]).all()  # Copies sit side by side.
  images = full[0]["image"].reshape(8, 3, -1)
  for triple in images:
    assert not np.array_equal(triple[0], triple[1])
    assert not np.array_equal(triple[1], triple[2])
  start = steps - 1  # Resume across the epoch boundary.
  resumed = [b for _, b in zip(range(3),
                               ds.train_batches(24, seed=7, start_step=start))]
  for got, want in zip(resumed, full[start:]):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  shards = [next(ds.train_batches(24, seed=7, start_step=start,
                                  process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([s["image"] for s in shards]), full[start]["image"])


def test_recipe_defaults_and_plain_configs():
  config = data_lib.default_config()
  assert (config.randaugment, config.random_erase, config.repeated_aug) == (
      "rand-m9-mstd0.5-inc1", 0.25, 3)
  assert config.augment == "inception"
  plain = data_lib.build(_digits_config(augment="none"), image_size=16)
  assert plain.repeats == 1 and plain.after_normalize is None
  off = data_lib.build(
      _digits_config(augment="none", randaugment="", random_erase=0.0,
                     repeated_aug=1), image_size=16)
  # "none" ignores the recipe's fields: batches are bit-identical.
  a, b = next(plain.train_batches(32, seed=1)), next(off.train_batches(32,
                                                                       seed=1))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("config_file", ["tiny.py", "demo.py"])
def test_builtin_digits_configs_get_no_extras(config_file):
  from modassem import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(str(REPO / "configs" / config_file) + ":meta", {})
  ds = data_lib.build(config.data, image_size=8)
  assert ds.repeats == 1 and ds.after_normalize is None


def test_recipe_config_errors():
  for field, value, words in (("randaugment", "rand-q1", "data.randaugment"),
                              ("random_erase", 1.5, "data.random_erase"),
                              ("repeated_aug", 0, "data.repeated_aug")):
    with pytest.raises(ModassemError, match=words):
      data_lib.build(_digits_config(**{field: value}), image_size=8)


# CIFAR recipe ----------------------------------------------------------------


def test_cifar_crop_pads_and_flips():
  image = tf().constant(np.full((32, 32, 3), 200, np.uint8))
  crop = augment.cifar_crop(32, 4)
  outs = [crop(image, _seed(3, s)).numpy() for s in range(30)]
  top_bands = set()
  for out in outs:
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    zero = (out == 0).all(-1)
    # Padding is only ever a band of at most 4 px along the edges.
    assert not zero[4:-4, 4:-4].any()
    np.testing.assert_array_equal(out[~zero], 200)
    top_bands.add(int(zero[:, 16].argmin()))  # Zero rows at the top.
  # Offsets 0..8 per axis: the top band takes several of its widths 0..4.
  assert len(top_bands) >= 3 and max(top_bands) <= 4
  flips = {crop(tf().constant(_synthetic()), _seed(1, s)).numpy()[16, 16, 0]
           for s in range(12)}
  assert len(flips) > 1


def test_cifar_transform_builds_with_randaugment():
  ds = data_lib.build(_digits_config(augment="cifar"), image_size=16)
  batch = next(ds.train_batches(12, seed=0))
  assert batch["image"].shape == (12, 16, 16, 3)
  assert ds.repeats == 3 and ds.after_normalize is not None
