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

The ops themselves are in image_ops.py, written to PIL's definitions on
TF's kernels. Keras 3 preprocessing layers are not used: their randomness
comes from a stateful layer seed generator, not from a per-example
stateless seed, and their magnitude ranges follow KerasCV, not timm.

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

from modassem.data import image_ops
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
      "AutoContrast": lambda x, lv, s: image_ops.autocontrast(x),
      "Equalize": lambda x, lv, s: image_ops.equalize(x),
      "Invert": lambda x, lv, s: image_ops.invert(x),
      "Rotate": lambda x, lv, s: image_ops.rotate(x, _signed(lv / d * 30.0, s), fill),
      "Posterize": lambda x, lv, s: image_ops.posterize(x, _int(lv / d * 4.0)),
      "PosterizeIncreasing":
          lambda x, lv, s: image_ops.posterize(x, 4.0 - _int(lv / d * 4.0)),
      "Solarize": lambda x, lv, s: image_ops.solarize(x, _int(lv / d * 256.0)),
      "SolarizeIncreasing":
          lambda x, lv, s: image_ops.solarize(x, 256.0 - _int(lv / d * 256.0)),
      "SolarizeAdd": lambda x, lv, s: image_ops.solarize_add(x, _int(lv / d * 110.0)),
      "Color": lambda x, lv, s: image_ops.color(x, _enhance(lv)),
      "ColorIncreasing":
          lambda x, lv, s: image_ops.color(x, _enhance_increasing(lv, s)),
      "Contrast": lambda x, lv, s: image_ops.contrast(x, _enhance(lv)),
      "ContrastIncreasing":
          lambda x, lv, s: image_ops.contrast(x, _enhance_increasing(lv, s)),
      "Brightness": lambda x, lv, s: image_ops.brightness(x, _enhance(lv)),
      "BrightnessIncreasing":
          lambda x, lv, s: image_ops.brightness(x, _enhance_increasing(lv, s)),
      "Sharpness": lambda x, lv, s: image_ops.sharpness(x, _enhance(lv)),
      "SharpnessIncreasing":
          lambda x, lv, s: image_ops.sharpness(x, _enhance_increasing(lv, s)),
      "ShearX": lambda x, lv, s: image_ops.shear_x(x, _signed(lv / d * 0.3, s), fill),
      "ShearY": lambda x, lv, s: image_ops.shear_y(x, _signed(lv / d * 0.3, s), fill),
      "TranslateXRel": lambda x, lv, s: image_ops.translate_x_rel(
          x, _signed(lv / d * TRANSLATE_PCT, s), fill),
      "TranslateYRel": lambda x, lv, s: image_ops.translate_y_rel(
          x, _signed(lv / d * TRANSLATE_PCT, s), fill),
  }
  return ops[name]


# The transform --------------------------------------------------------------


def apply_op(image, name: str, level, negate, fill):
  """One named op at a fixed level (for tests and inspection)."""
  t = tf()
  return op_fn(name, fill)(image_ops.quantise(t.cast(image, t.float32)),
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
    image = t.ensure_shape(image_ops.quantise(t.cast(image, t.float32)), [None, None, 3])
    seeds = t.random.experimental.stateless_split(seed, num=policy.num_ops)
    for i in range(policy.num_ops):
      image = one_op(image, seeds[i])
    return t.ensure_shape(image, [None, None, 3])

  return apply


def fill_colour(mean) -> tuple[int, int, int]:
  """timm's `img_mean` hparam: the normalisation mean in 0..255."""
  return tuple(min(255, round(255 * float(m))) for m in mean)
