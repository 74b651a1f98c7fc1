"""Per-example image transforms, written as pure TF functions.

Every random train transform has the signature `fn(image, seed) -> image`,
where `seed` is an int64 [2] tensor for TF's *stateless* random ops. The seed
is derived from (run seed, epoch, position in epoch), so an example looks the
same no matter where the iterator was started or which process reads it.

Images travel as float32 [H, W, 3] in 0..255 until `normalize`. New train
augmentations are added by registering a factory in `TRAIN_TRANSFORMS` or by
composing steps with `chain`.

The DeiT recipe's extras ride on the "inception" and "cifar" transforms only
(`RECIPE_TRANSFORMS`): RandAugment (`data.randaugment`) runs after the crop
and flip, on the 0..255 image; random erasing (`data.random_erase`) runs
after normalisation, as in timm, through `random_erasing`. "none" stays a
plain resize whatever those fields say, so demo and test configs are exact.
"""

import math
from typing import Callable

import ml_collections

from modassem.data import randaugment
from modassem.data._tf import tf

# Train transforms that take RandAugment, random erasing and repeated
# augmentation from the config.
RECIPE_TRANSFORMS = ("inception", "cifar")

# (image, seed) -> image; the seam every random augmentation plugs into.
Transform = Callable[..., "tf.Tensor"]


def resize(image, size: int):
  """Resizes to size x size (bicubic; antialiased when shrinking), 0..255."""
  out = tf().image.resize(
      tf().cast(image, tf().float32), [size, size], method="bicubic",
      antialias=True)
  # Bicubic overshoots; keep pixel values in the range normalisation expects.
  return tf().clip_by_value(out, 0.0, 255.0)


def resize_shorter_and_centre_crop(image, size: int, crop_ratio: float):
  """Eval transform: shorter side to size / crop_ratio, then centre crop."""
  t = tf()
  resize_to = int(size / crop_ratio)
  shape = t.shape(image)
  h = t.cast(shape[0], t.float32)
  w = t.cast(shape[1], t.float32)
  scale = resize_to / t.minimum(h, w)
  # Round, never below the crop size, so the crop always fits.
  new_h = t.maximum(t.cast(t.round(h * scale), t.int32), size)
  new_w = t.maximum(t.cast(t.round(w * scale), t.int32), size)
  out = t.image.resize(
      t.cast(image, t.float32), t.stack([new_h, new_w]), method="bicubic",
      antialias=True)
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  out = out[top:top + size, left:left + size, :]
  out = t.ensure_shape(out, [size, size, 3])
  return t.clip_by_value(out, 0.0, 255.0)


def inception_crop(size: int, area_min: float,
                   aspect_range=(3 / 4, 4 / 3)) -> Transform:
  """Random resized crop (Szegedy et al.) then random horizontal flip."""

  def apply(image, seed):
    t = tf()
    crop_seed, flip_seed = t.unstack(
        t.random.experimental.stateless_split(seed, num=2))
    begin, crop_size, _ = t.image.stateless_sample_distorted_bounding_box(
        t.shape(image),
        # The whole image is the "object"; min_object_covered=0 lets the
        # crop land anywhere, as torchvision's RandomResizedCrop does.
        bounding_boxes=t.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_range,
        area_range=(area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = t.slice(image, begin, crop_size)
    out = resize(crop, size)
    return t.image.stateless_random_flip_left_right(out, flip_seed)

  return apply


def cifar_crop(size: int, padding: int) -> Transform:
  """Zero-pad by `padding`, random size x size crop, random horizontal flip.

  torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, the CIFAR
  recipe. Images of another size are first resized to size x size.
  """

  def apply(image, seed):
    t = tf()
    crop_seed, flip_seed = t.unstack(
        t.random.experimental.stateless_split(seed, num=2))
    out = resize(image, size)  # Exact identity at the native size.
    out = t.pad(out, [[padding, padding], [padding, padding], [0, 0]])
    out = t.image.stateless_random_crop(out, [size, size, 3], crop_seed)
    return t.image.stateless_random_flip_left_right(out, flip_seed)

  return apply


def random_erasing(prob: float, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3),
                   attempts: int = 10) -> Transform:
  """timm's RandomErasing(mode="pixel", max_count=1) on a normalised image.

  With probability `prob`, one box of area fraction U(area) and log-uniform
  aspect ratio (h / w) in `aspect` is filled with N(0, 1) noise per pixel
  and channel. Like timm, up to `attempts` box sizes are drawn and the first
  that fits inside the image is used; none fitting means no erasing.
  """

  def apply(image, seed):
    t = tf()
    s = t.random.experimental.stateless_split(seed, num=6)
    shape = t.shape(image)
    h, w = shape[0], shape[1]
    total = t.cast(h * w, t.float32)
    target = t.random.stateless_uniform([attempts], s[0], *area) * total
    ratio = t.exp(t.random.stateless_uniform(
        [attempts], s[1], math.log(aspect[0]), math.log(aspect[1])))
    box_h = t.cast(t.round(t.sqrt(target * ratio)), t.int32)
    box_w = t.cast(t.round(t.sqrt(target / ratio)), t.int32)
    fits = (box_h < h) & (box_w < w)
    # First attempt that fits, as timm's loop breaks on it.
    first = t.argmax(t.cast(fits, t.int32), output_type=t.int32)
    box_h, box_w = box_h[first], box_w[first]
    top = t.random.stateless_uniform([], s[2], 0, h - box_h + 1, t.int32)
    left = t.random.stateless_uniform([], s[3], 0, w - box_w + 1, t.int32)
    erase = t.logical_and(t.reduce_any(fits),
                          t.random.stateless_uniform([], s[4]) < prob)
    rows = t.range(h)[:, None]
    cols = t.range(w)[None, :]
    box = ((rows >= top) & (rows < top + box_h) & (cols >= left)
           & (cols < left + box_w) & erase)
    noise = t.random.stateless_normal(shape, s[5], dtype=image.dtype)
    return t.where(box[:, :, None], noise, image)

  return apply


def resize_only(size: int) -> Transform:
  """The 'none' augmentation: a deterministic resize, seed ignored."""
  return lambda image, seed: resize(image, size)


def chain(*steps: Transform) -> Transform:
  """Composes transforms, giving each step its own independent seed."""

  def apply(image, seed):
    seeds = tf().random.experimental.stateless_split(seed, num=len(steps))
    for i, step in enumerate(steps):
      image = step(image, seeds[i])
    return image

  return apply


def with_randaugment(data: ml_collections.ConfigDict,
                     base: Transform) -> Transform:
  """`base` then RandAugment per `data.randaugment` ("" = `base` alone)."""
  spec = str(data.randaugment or "")
  if not spec:
    return base
  policy = randaugment.parse(spec)
  fill = randaugment.fill_colour(data.mean)
  return chain(base, randaugment.rand_augment(policy, fill))


def _inception(data: ml_collections.ConfigDict, size: int) -> Transform:
  return with_randaugment(data, inception_crop(size, float(data.crop_area_min)))


def _cifar(data: ml_collections.ConfigDict, size: int) -> Transform:
  # 4 px at CIFAR's 32 px, in proportion at other sizes.
  return with_randaugment(data, cifar_crop(size, max(1, round(size / 8))))


def _none(data: ml_collections.ConfigDict, size: int) -> Transform:
  del data
  return resize_only(size)


# data.augment name -> factory(data config, image_size) -> Transform.
TRAIN_TRANSFORMS: dict[str, Callable[[ml_collections.ConfigDict, int],
                                     Transform]] = {
    "inception": _inception,
    "cifar": _cifar,
    "none": _none,
}


def normalize(image, mean, std):
  """(x / 255 - mean) / std, per channel, float32."""
  t = tf()
  mean = t.constant(mean, t.float32)
  std = t.constant(std, t.float32)
  return (t.cast(image, t.float32) / 255.0 - mean) / std
