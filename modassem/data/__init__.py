"""Input pipelines: `build(config.data, image_size)` returns a `Dataset`.

Sources (`data.name`):
  digits: scikit-learn's 8x8 digits, stored in modassem (no download); a
    fixed stratified 80/20 train/eval split. For demos and tests.
  folder: images in `data.path`/train/<class>/* and val/<class>/* (or
    test/<class>/*), the layout of the official Deep Incubation code.
  tfds:   a prepared TensorFlow Datasets dataset (`data.tfds_name`); never
    downloads unless `data.download` is True.

TensorFlow is imported on the first `build`, not by `import modassem.data`.
"""

import ml_collections

from modassem.data.dataset import Dataset
from modassem.errors import ModassemError

__all__ = ["Dataset", "build", "default_config"]

SOURCES = ("digits", "folder", "tfds")


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.data`."""
  return ml_collections.ConfigDict({
      "name": "digits",
      "path": "",
      "tfds_name": "",
      "tfds_data_dir": "",
      "manual_dir": "",
      "download": False,
      "train_split": "train",
      # "" = auto: folder -> val/ else test/; tfds -> validation else test.
      "eval_split": "",
      # "inception" (ImageNet), "cifar" (pad 4 + crop + flip) or "none".
      "augment": "inception",
      # The DeiT recipe's extras; they apply to the "inception" and "cifar"
      # transforms only, never to "none" (the demo and test configs).
      # timm policy string; "" turns RandAugment off.
      "randaugment": "rand-m9-mstd0.5-inc1",
      # Probability of erasing one box with per-pixel noise; 0 = off.
      "random_erase": 0.25,
      # Copies of each chosen image per epoch (DeiT's RASampler); 1 = off.
      "repeated_aug": 3,
      "crop_area_min": 0.08,
      "eval_crop_ratio": 0.875,
      "mean": (0.485, 0.456, 0.406),
      "std": (0.229, 0.224, 0.225),
      # Class-balanced, deterministic subset of the train split.
      "train_fraction": 1.0,
      # Which subset train_fraction keeps; apart from the run seed, so all phases share it.
      "subset_seed": 0,
      "prefetch": 2,
      # tf.data threads; 0 (or -1, tf.data.AUTOTUNE) lets tf.data size its pool.
      "threads": 0,
  })


def _channels(data, field: str) -> tuple[float, float, float]:
  values = tuple(float(v) for v in data[field])
  if len(values) != 3 or (field == "std" and min(values) <= 0):
    raise ModassemError(
        f"data.{field}={values} is invalid: give three per-channel values "
        f"(RGB){', all positive' if field == 'std' else ''}")
  return values


def _recipe_extras(data, augment_name: str) -> tuple[float, int]:
  """(erasing probability, repeats), checked; off unless the transform is
  one of augment.RECIPE_TRANSFORMS."""
  from modassem.data import augment  # pylint: disable=g-import-not-at-top
  from modassem.data import randaugment  # pylint: disable=g-import-not-at-top
  if data.randaugment:
    randaugment.parse(str(data.randaugment))  # Fails early on a typo.
  erase_prob = float(data.random_erase)
  if not 0.0 <= erase_prob <= 1.0:
    raise ModassemError(
        f"data.random_erase={data.random_erase} is out of range: use a "
        "probability in [0, 1], e.g. 0.25, or 0 to turn erasing off")
  repeats = data.repeated_aug
  if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
    raise ModassemError(
        f"data.repeated_aug={repeats} is invalid: use a whole number >= 1, "
        "e.g. 3, or 1 to turn repeated augmentation off")
  if augment_name not in augment.RECIPE_TRANSFORMS:
    return 0.0, 1
  return erase_prob, int(repeats)


def build(data: ml_collections.ConfigDict, image_size: int) -> Dataset:
  """Creates the dataset described by `config.data` at `image_size` pixels."""
  from modassem.data import augment  # pylint: disable=g-import-not-at-top
  from modassem.data import sources  # pylint: disable=g-import-not-at-top
  from modassem.data import tfds_source  # pylint: disable=g-import-not-at-top

  # Fields the caller left out take their defaults.
  merged = default_config().to_dict()
  merged.update(data.to_dict() if hasattr(data, "to_dict") else dict(data))
  data = ml_collections.ConfigDict(merged)

  if int(image_size) <= 0:
    raise ModassemError(
        f"image_size={image_size} must be positive: set the model's image "
        "size, e.g. 224")
  image_size = int(image_size)
  name = str(data.name)
  if name not in SOURCES:
    raise ModassemError(
        f"data.name={name!r} is unknown: use one of {', '.join(SOURCES)}")
  augment_name = str(data.augment)
  if augment_name not in augment.TRAIN_TRANSFORMS:
    raise ModassemError(
        f"data.augment={augment_name!r} is unknown: use one of "
        f"{', '.join(augment.TRAIN_TRANSFORMS)}")
  if not 0.0 < float(data.crop_area_min) <= 1.0:
    raise ModassemError(
        f"data.crop_area_min={data.crop_area_min} is out of range: use a "
        "value in (0, 1], e.g. 0.08")
  if not 0.0 < float(data.eval_crop_ratio) <= 1.0:
    raise ModassemError(
        f"data.eval_crop_ratio={data.eval_crop_ratio} is out of range: use a "
        "value in (0, 1], e.g. 0.875")
  if not 0.0 < float(data.train_fraction) <= 1.0:
    raise ModassemError(
        f"data.train_fraction={data.train_fraction} is out of range: use a "
        "value in (0, 1], e.g. 0.1 to train on 10 % of each class")
  mean, std = _channels(data, "mean"), _channels(data, "std")
  erase_prob, repeats = _recipe_extras(data, augment_name)

  if name == "digits":
    source = sources.digits(data, image_size)
  elif name == "folder":
    source = sources.folder(data, image_size)
  else:
    source = tfds_source.tfds_source(data, image_size)
  if source.num_eval == 0:
    raise ModassemError(
        f"the eval split of {source.name} is empty: add eval examples or set "
        "--config.data.eval_split")

  return Dataset(
      name=source.name,
      num_classes=source.num_classes,
      num_train=source.num_train,
      num_eval=source.num_eval,
      image_size=image_size,
      source=source,
      train_transform=augment.TRAIN_TRANSFORMS[augment_name](data, image_size),
      mean=mean,
      std=std,
      eval_crop_ratio=float(data.eval_crop_ratio),
      prefetch=max(1, int(data.prefetch)),
      threads=max(0, int(data.threads)),
      after_normalize=(augment.random_erasing(erase_prob) if erase_prob > 0
                       else None),
      repeats=repeats,
  )
