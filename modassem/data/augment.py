"""Per-example image transforms, written as pure TF functions.

Every random train transform has the signature `fn(image, seed) -> image`,
where `seed` is an int64 [2] tensor for TF's *stateless* random ops. The seed
is derived from (run seed, epoch, position in epoch), so an example looks the
same no matter where the iterator was started or which process reads it.

Images travel as float32 [H, W, 3] in 0..255 until `normalize`. New train
augmentations (RandAugment, random erasing, ...) are added by registering a
factory in `TRAIN_TRANSFORMS` or by composing steps with `chain`.
"""

from typing import Callable

import ml_collections

from modassem.data._tf import tf

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


def _inception(data: ml_collections.ConfigDict, size: int) -> Transform:
  return inception_crop(size, float(data.crop_area_min))


def _none(data: ml_collections.ConfigDict, size: int) -> Transform:
  del data
  return resize_only(size)


# data.augment name -> factory(data config, image_size) -> Transform.
TRAIN_TRANSFORMS: dict[str, Callable[[ml_collections.ConfigDict, int],
                                     Transform]] = {
    "inception": _inception,
    "none": _none,
}


def normalize(image, mean, std):
  """(x / 255 - mean) / std, per channel, float32."""
  t = tf()
  mean = t.constant(mean, t.float32)
  std = t.constant(std, t.float32)
  return (t.cast(image, t.float32) / 255.0 - mean) / std
