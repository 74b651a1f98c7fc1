"""The image ops of timm's RandAugment, written in TF to PIL's definitions (PIL is what timm calls).

Images are float32 [H, W, 3] holding integers 0..255; every op returns the same, as PIL works on uint8 images.
The PIL enhancement blends (Color, Contrast, Brightness, Sharpness), Equalize, AutoContrast, Posterize and the
Solarize ops are a few lines each; the geometric ops use the `ImageProjectiveTransformV3` kernel behind Keras'
affine transforms. How each compares with PIL is in randaugment.py's docstring and tests/test_randaugment_pil.py.
"""

import math

from modassem.data._tf import tf


# Pixel ops ------------------------------------------------------------------


def quantise(image):
  """Back to the uint8 grid PIL works on, kept as float."""
  return tf().clip_by_value(tf().round(image), 0.0, 255.0)


def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate)."""
  return tf().clip_by_value(tf().floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _gray(image):
  """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16 in integers, i.e. ITU-R 601 luma rounded."""
  t = tf()
  rgb = t.cast(image, t.int32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536
  return t.cast(luma, t.float32)[..., None]


def color(image, factor):
  return _blend(tf().image.grayscale_to_rgb(_gray(image)), image, factor)


def contrast(image, factor):
  # PIL blends with one grey level: the mean of the grayscale image.
  mean = tf().round(tf().reduce_mean(_gray(image)))
  return _blend(tf().fill(tf().shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf().zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter; border pixels stay unfiltered as in PIL."""
  t = tf()
  kernel = t.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], t.float32) / 13.0
  kernel = t.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = t.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = t.pad(quantise(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = t.pad(t.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = interior * smooth + (1.0 - interior) * image
  return _blend(degenerate, image, factor)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  """Keeps the top `bits` bits of each channel (bits in 0..8)."""
  step = tf().pow(2.0, 8.0 - tf().cast(bits, tf().float32))
  return tf().floor(image / step) * step


def solarize(image, threshold):
  """Inverts pixels >= threshold (256 = identity)."""
  return tf().where(image >= threshold, 255.0 - image, image)


def solarize_add(image, add, threshold=128.0):
  """Adds `add` to pixels below the threshold, clipped at 255."""
  return tf().where(image < threshold,
                    tf().minimum(image + add, 255.0), image)


def _channel_autocontrast(channel):
  # In double, as PIL builds its lookup table in Python: float32 moves about 0.1 % of pixels by one level.
  t = tf()
  c = t.cast(channel, t.float64)
  lo, hi = t.reduce_min(c), t.reduce_max(c)
  scale = 255.0 / t.maximum(hi - lo, 1.0)
  # PIL's lookup table: int(value * scale + offset), offset = -lo * scale.
  stretched = t.clip_by_value(t.floor(c * scale + (-lo * scale)), 0.0, 255.0)
  return t.cast(t.where(hi > lo, stretched, c), t.float32)


def autocontrast(image):
  """PIL ImageOps.autocontrast (cutoff 0): per-channel min..max -> 0..255."""
  return tf().stack(
      [_channel_autocontrast(image[..., c]) for c in range(3)], axis=-1)


def _channel_equalize(channel):
  """PIL ImageOps.equalize on one channel (integers 0..255)."""
  t = tf()
  values = t.cast(channel, t.int32)
  hist = t.math.bincount(t.reshape(values, [-1]), minlength=256, maxlength=256)
  last = t.gather(hist, t.reduce_max(t.where(hist > 0, t.range(256), -1)))
  # PIL: step = (pixels - pixels of the highest value present) // 255.
  step = (t.reduce_sum(hist) - last) // 255
  # lut[i] = (step // 2 + number of pixels below i) // step
  below = t.cumsum(hist, exclusive=True)
  lut = t.clip_by_value((step // 2 + below) // t.maximum(step, 1), 0, 255)
  equalised = t.cast(t.gather(lut, values), t.float32)
  return t.where(step > 0, equalised, channel)


def equalize(image):
  return tf().stack([_channel_equalize(image[..., c]) for c in range(3)],
                    axis=-1)


# Geometric ops ----------------------------------------------------------------


def _warp(image, matrix, fill):
  """Affine warp; `matrix` (a, b, c, d, e, f) maps output to input xy.

  `matrix` is in PIL's convention (pixel centres at +0.5), converted here to
  the kernel's (centres at integers), so shears match PIL's sub-pixel
  placement. Shifting by the fill colour lets the kernel's single scalar
  fill (0) act as a per-channel one: bilinear interpolation commutes with
  the shift.
  """
  t = tf()
  fill = t.constant(fill, t.float32)
  a, b, c, d, e, f = matrix
  matrix = [a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0)]
  transform = t.concat([t.stack(matrix), t.zeros([2])], axis=0)[None]
  out = t.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=t.cast(transform, t.float32),
      output_shape=t.shape(image)[:2], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return quantise(out + fill)


def rotate(image, degrees, fill):
  """Counter-clockwise about the centre, as PIL's Image.rotate."""
  t = tf()
  theta = degrees * (math.pi / 180.0)
  cos, sin = t.cos(theta), t.sin(theta)
  h = t.cast(t.shape(image)[0], t.float32)
  w = t.cast(t.shape(image)[1], t.float32)
  cx, cy = w / 2.0, h / 2.0
  matrix = [cos, -sin, cx - cos * cx + sin * cy,
            sin, cos, cy - sin * cx - cos * cy]
  return _warp(image, matrix, fill)


def shear_x(image, factor, fill):
  one, zero = tf().constant(1.0), tf().constant(0.0)
  return _warp(image, [one, factor, zero, zero, one, zero], fill)


def shear_y(image, factor, fill):
  one, zero = tf().constant(1.0), tf().constant(0.0)
  return _warp(image, [one, zero, zero, factor, one, zero], fill)


def translate_x_rel(image, pct, fill):
  one, zero = tf().constant(1.0), tf().constant(0.0)
  pixels = pct * tf().cast(tf().shape(image)[1], tf().float32)
  return _warp(image, [one, zero, pixels, zero, one, zero], fill)


def translate_y_rel(image, pct, fill):
  one, zero = tf().constant(1.0), tf().constant(0.0)
  pixels = pct * tf().cast(tf().shape(image)[0], tf().float32)
  return _warp(image, [one, zero, zero, zero, one, pixels], fill)
