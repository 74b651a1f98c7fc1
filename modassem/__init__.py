"""Deep Incubation in JAX/Flax. `modassem.load(PATH) -> (model, params)` reads a run or an official checkpoint."""

import os as _os

# Run directories on gs:// go through gcsfs, not TensorFlow's file system (see modassem/files.py); set before
# anything resolves a gs:// path, which epath decides once per process. EPATH_USE_TF=true in the environment wins.
_os.environ.setdefault("EPATH_USE_TF", "false")


def load(path, **kwargs):
  """(model, params) of a run directory or an official `.pth` file; see `modassem.api.load`."""
  # Imported here: `import modassem` (and so the CLI) stays free of JAX and torch until a model is wanted.
  from modassem.api import load as _load  # pylint: disable=g-import-not-at-top
  return _load(path, **kwargs)
