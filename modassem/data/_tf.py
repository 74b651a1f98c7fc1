"""Lazy, quiet access to TensorFlow and TFDS.

The data pipeline runs on tf.data, but `import modassem` must stay light and
TensorFlow must never claim accelerator memory that JAX needs, so TF is
imported on first use only, with its C++ logging silenced and GPUs hidden.
"""

import contextlib
import functools
import os
import sys
import tempfile


# Lines TensorFlow's C++ start-up logs whatever TF_CPP_MIN_LOG_LEVEL says (TensorFlow 2.18 and later log through
# absl before absl's logging is initialised, where that variable is not read): at every import, absl's notice that
# logging is not initialised and TF's that oneDNN's operations are on, each twice. They are notices, not warnings,
# and would open the output of every run.
_START_UP_NOTICES = (b"All log messages before absl::InitializeLog() is called are written to STDERR",
                     b"] oneDNN custom operations are on.")


@contextlib.contextmanager
def _start_up_notices_left_out():
  """File descriptor 2 caught in a temporary file, and written back without `_START_UP_NOTICES`.

  C++ writes them to the descriptor, out of reach of Python's `sys.stderr`. Anything else written there meanwhile
  (a warning, an error) is written back as it came, in its order, once the block ends, whether or not it raised.
  A process killed inside the block (TensorFlow aborts on a CPU it was not built for) loses it: with
  TF_CPP_MIN_LOG_LEVEL=0, asking for all of TensorFlow's log, nothing is caught. Nor is it where there is no
  descriptor 2 or no temporary file to catch it in.
  """
  saved = None
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
    try:
      caught = tempfile.TemporaryFile()
    except OSError:
      caught = None
    if caught is not None:
      try:
        if sys.stderr is not None:
          sys.stderr.flush()
        saved = os.dup(2)
      except (OSError, ValueError):   # descriptor 2 or sys.stderr closed
        caught.close()
  if saved is None:
    yield
    return
  with caught:
    try:
      os.dup2(caught.fileno(), 2)
      yield
    finally:
      with contextlib.suppress(OSError, ValueError):
        if sys.stderr is not None:
          sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      kept = b"".join(line for line in caught.read().splitlines(keepends=True)
                      if not any(notice in line for notice in _START_UP_NOTICES))
      if kept:
        with open(2, "wb", closefd=False) as err:   # all of it, in as many writes as the descriptor takes
          err.write(kept)


@functools.cache
def tf():
  """Returns the `tensorflow` module, imported once with GPUs hidden."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    with _start_up_notices_left_out():
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
