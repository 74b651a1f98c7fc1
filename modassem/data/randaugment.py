"""RandAugment as timm implements it (`rand-m9-mstd0.5-inc1`), in stateless TF.

A policy string `rand-m9-n2-mstd0.5-inc1` reads like timm's: `m` magnitude
(0..10), `n` ops per image, `mstd` std of the per-op Gaussian magnitude
noise, `mmax` the magnitude's upper clip (default 10), `inc` 1 for the
"increasing" op set, `p` the probability of applying each chosen op
(timm's default 0.5). Ops are drawn uniformly with replacement; each op then
draws its own magnitude N(m, mstd) clipped to [0, mmax] and, for signed ops,
a random sign. All randomness comes from the per-example seed through
`tf.random.stateless_*`, so an example's augmentation depends on its seed
only.

Images are float32 [H, W, 3] in 0..255. They are rounded to integers on
entry and after every op, as timm works on uint8 PIL images.

Library ops used: tf.image (grayscale, flips), the
`ImageProjectiveTransformV3` kernel behind Keras' affine transforms, and
tf.nn convolutions. Keras 3 preprocessing layers are not used: their
randomness comes from a stateful layer seed generator, not from a
per-example stateless seed, and their magnitude ranges follow KerasCV, not
timm. The PIL enhancement blends (Color, Contrast, Brightness, Sharpness),
Equalize, AutoContrast, Posterize and the Solarize ops are a few lines of TF
each and are written here to PIL's definitions.

Where this differs from timm (PIL), as measured against PIL op by op on
photographs at magnitudes 0, 5, 9 and 10 (tests/test_randaugment_pil.py):
* Equalize, Invert, Posterize, Solarize and SolarizeAdd equal PIL's exactly.
  So do AutoContrast, Color, Contrast, Brightness and Sharpness: blends
  truncate as PIL's `Image.blend` does, grey is PIL's integer luma, and the
  enhancement factor and AutoContrast's table are computed in double where
  PIL computes them in Python.
* Geometric ops (Rotate, ShearX/Y, TranslateX/YRel) interpolate bilinearly;
  the recipe asks for bicubic (DeiT passes `interpolation='bicubic'`; timm
  picks bilinear or bicubic at random only when none is given). TF has no
  bicubic affine warp. Against PIL's bilinear warp, every output pixel whose
  four taps lie inside the image is within 1 level. Pixels in the one-pixel
  ring where the taps straddle the image border differ by up to 75 levels
  (3-5 % of pixels): the kernel blends them with the fill colour, where PIL
  cuts them hard. Against PIL's bicubic warp, interior pixels differ by up
  to 52 levels; at m=9..10 on 32-px images 50-73 % of them by more than 1
  (29-51 % on 48-px images): bicubic keeps edges sharper than bilinear.
* PosterizeIncreasing at m=10 keeps 0 bits (a black image), as timm asks;
  current Pillow refuses 0 bits in `ImageOps.posterize`.
* The magnitude noise, op choice, sign and apply-probability come from TF's
  stateless generators, not Python's `random`/numpy: the same distributions,
  different draws.
* The policy string's `w` (op choice weights) part is not supported.

Elsewhere in the recipe (augment.py, dataset.py):
* Random erasing draws the box position after picking the first box size
  that fits, timm inside its attempt loop: the same distribution.
* Repeated augmentation builds RASampler's global order, but each process
  takes a contiguous slice of the global batch, so an image's copies mostly
  share a process where RASampler spreads them over replicas (dataset.py).
  RASampler also cuts each epoch to a multiple of 256 images; here an
  epoch keeps whole global batches, as without repeats.
* The "cifar" transform pads 4 px at 32 px and in proportion at other
  sizes; torchvision's RandomCrop pads a fixed amount.
"""

import dataclasses
import math

from modassem.data._tf import tf
from modassem.errors import ModassemError

LEVEL_DENOM = 10.0
# Fraction of the image width (height) TranslateXRel (YRel) moves at m=10.
TRANSLATE_PCT = 0.45

INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm's original (non-increasing) set, selected by `inc0`.
DEFAULT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
    "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class Policy:
  """A parsed `rand-...` string."""
  magnitude: float = 9.0
  num_ops: int = 2
  magnitude_std: float = 0.5
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = True
  prob: float = 0.5

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else DEFAULT_OPS


def parse(spec: str) -> Policy:
  """Parses timm's `rand-m9-mstd0.5-inc1` syntax; errors name the bad part."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ModassemError(
        f"data.randaugment={spec!r} is not a RandAugment policy: use e.g. "
        "'rand-m9-mstd0.5-inc1', or '' to turn it off")
  fields = {}
  keys = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing",
          "m": "magnitude", "n": "num_ops", "p": "prob"}
  for part in parts[1:]:
    # Longest key first: "mstd" and "mmax" also start with "m".
    key = next((k for k in keys if part.startswith(k)), None)
    try:
      value = float(part[len(key):]) if key else None
    except ValueError:
      value = None
    if value is None:
      raise ModassemError(
          f"data.randaugment={spec!r}: cannot read {part!r}; known parts are "
          "m<magnitude>, n<ops>, mstd<std>, mmax<max>, inc<0|1>, p<prob>")
    fields[keys[key]] = value
  policy = Policy(
      magnitude=fields.get("magnitude", 9.0),
      num_ops=int(fields.get("num_ops", 2)),
      magnitude_std=fields.get("magnitude_std", 0.5),
      magnitude_max=fields.get("magnitude_max", LEVEL_DENOM),
      increasing=bool(fields.get("increasing", 0)),
      prob=fields.get("prob", 0.5))
  if policy.num_ops < 1 or not 0.0 <= policy.prob <= 1.0 or (
      policy.magnitude_std < 0):
    raise ModassemError(
        f"data.randaugment={spec!r} is out of range: n >= 1, 0 <= p <= 1 and "
        "mstd >= 0")
  return policy


# Pixel ops ------------------------------------------------------------------


def _quantise(image):
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
  smooth = t.pad(_quantise(smooth), [[1, 1], [1, 1], [0, 0]])
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
  return _quantise(out + fill)


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


# Levels: timm's `_*_level_to_arg`, level in [0, 10] -> op argument ----------


def _signed(value, negate):
  return tf().where(negate, -value, value)


def _enhance_increasing(level, negate):
  factor = 1.0 + _signed(tf().cast(level, tf().float64) / LEVEL_DENOM * 0.9, negate)
  return tf().cast(tf().maximum(factor, tf().constant(0.1, tf().float64)), tf().float32)


def _enhance(level):
  # In double, then to float32: what timm's Python float becomes in PIL's C blend, bit for bit.
  return tf().cast(tf().cast(level, tf().float64) / LEVEL_DENOM * 1.8 + 0.1, tf().float32)


def _int(x):
  return tf().floor(x)  # Python's int() of a non-negative level.


def op_fn(name: str, fill):
  """(image, level, negate) -> image for one of timm's op names."""
  d = LEVEL_DENOM
  ops = {
      "AutoContrast": lambda x, lv, s: autocontrast(x),
      "Equalize": lambda x, lv, s: equalize(x),
      "Invert": lambda x, lv, s: invert(x),
      "Rotate": lambda x, lv, s: rotate(x, _signed(lv / d * 30.0, s), fill),
      "Posterize": lambda x, lv, s: posterize(x, _int(lv / d * 4.0)),
      "PosterizeIncreasing":
          lambda x, lv, s: posterize(x, 4.0 - _int(lv / d * 4.0)),
      "Solarize": lambda x, lv, s: solarize(x, _int(lv / d * 256.0)),
      "SolarizeIncreasing":
          lambda x, lv, s: solarize(x, 256.0 - _int(lv / d * 256.0)),
      "SolarizeAdd": lambda x, lv, s: solarize_add(x, _int(lv / d * 110.0)),
      "Color": lambda x, lv, s: color(x, _enhance(lv)),
      "ColorIncreasing":
          lambda x, lv, s: color(x, _enhance_increasing(lv, s)),
      "Contrast": lambda x, lv, s: contrast(x, _enhance(lv)),
      "ContrastIncreasing":
          lambda x, lv, s: contrast(x, _enhance_increasing(lv, s)),
      "Brightness": lambda x, lv, s: brightness(x, _enhance(lv)),
      "BrightnessIncreasing":
          lambda x, lv, s: brightness(x, _enhance_increasing(lv, s)),
      "Sharpness": lambda x, lv, s: sharpness(x, _enhance(lv)),
      "SharpnessIncreasing":
          lambda x, lv, s: sharpness(x, _enhance_increasing(lv, s)),
      "ShearX": lambda x, lv, s: shear_x(x, _signed(lv / d * 0.3, s), fill),
      "ShearY": lambda x, lv, s: shear_y(x, _signed(lv / d * 0.3, s), fill),
      "TranslateXRel": lambda x, lv, s: translate_x_rel(
          x, _signed(lv / d * TRANSLATE_PCT, s), fill),
      "TranslateYRel": lambda x, lv, s: translate_y_rel(
          x, _signed(lv / d * TRANSLATE_PCT, s), fill),
  }
  return ops[name]


# The transform --------------------------------------------------------------


def apply_op(image, name: str, level, negate, fill):
  """One named op at a fixed level (for tests and inspection)."""
  t = tf()
  return op_fn(name, fill)(_quantise(t.cast(image, t.float32)),
                           t.constant(level, t.float32),
                           t.constant(negate, t.bool))


def _one_op(image, seed, policy: Policy, branches):
  t = tf()
  s = t.random.experimental.stateless_split(seed, num=4)
  which = t.random.stateless_uniform(
      [], s[0], 0, len(branches), dtype=t.int32)
  noise = t.random.stateless_normal([], s[1]) * policy.magnitude_std
  level = t.clip_by_value(policy.magnitude + noise, 0.0, policy.magnitude_max)
  negate = t.random.stateless_uniform([], s[2]) < 0.5
  applied = t.random.stateless_uniform([], s[3]) < policy.prob
  return t.cond(
      applied,
      lambda: t.switch_case(which, [lambda f=f: f(image, level, negate)
                                    for f in branches]),
      lambda: image)


def rand_augment(policy: Policy, fill):
  """Transform `fn(image, seed)` applying `policy` (images 0..255 float)."""
  branches = [op_fn(name, tuple(float(v) for v in fill))
              for name in policy.ops]
  # Traced once and reused by every op slot and every epoch's pipeline:
  # the 15-way switch is costly to trace and optimise.
  one_op = tf().function(
      lambda image, seed: _one_op(image, seed, policy, branches),
      input_signature=[tf().TensorSpec([None, None, 3], tf().float32),
                       tf().TensorSpec([2], tf().int64)])

  def apply(image, seed):
    t = tf()
    image = t.ensure_shape(_quantise(t.cast(image, t.float32)), [None, None, 3])
    seeds = t.random.experimental.stateless_split(seed, num=policy.num_ops)
    for i in range(policy.num_ops):
      image = one_op(image, seeds[i])
    return t.ensure_shape(image, [None, None, 3])

  return apply


def fill_colour(mean) -> tuple[int, int, int]:
  """timm's `img_mean` hparam: the normalisation mean in 0..255."""
  return tuple(min(255, round(255 * float(m))) for m in mean)
