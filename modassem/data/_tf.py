"""Lazy, quiet access to TensorFlow and TFDS.

The data pipeline runs on tf.data, but `import modassem` must stay light and
TensorFlow must never claim accelerator memory that JAX needs, so TF is
imported on first use only, with its C++ logging silenced and GPUs hidden.
"""

import functools
import os


@functools.cache
def tf():
  """Returns the `tensorflow` module, imported once with GPUs hidden."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  except ImportError:
    from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
    raise ModassemError("TensorFlow is not installed, and the input pipeline runs on tf.data: pip install "
                        "'modassem[cpu]' (or [gpu], [tpu]; they add tensorflow-cpu), or any tensorflow") from None
  # Deprecation notices from TF/TFDS internals are noise in training logs.
  tensorflow.get_logger().setLevel("ERROR")
  try:
    # JAX owns the accelerators; TF only decodes and augments on the host.
    tensorflow.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Devices were already initialised by someone else; nothing to hide now.
    pass
  return tensorflow


def graph_fn(fn):
  """`fn` as a tf.data function, traced as written.

  The pipeline's functions use TF ops only, with no Python control flow on tensors, so AutoGraph's rewrite of their
  source (about half a CPU second at the start of every run, most of it parsing and transforming Python) buys
  nothing. A function that did branch on a tensor fails at tracing, at the start of a run, rather than silently.
  """
  return tf().autograph.experimental.do_not_convert(fn)


@functools.cache
def tfds():
  """Returns the `tensorflow_datasets` module (imports TF first)."""
  tf()
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  return tensorflow_datasets
