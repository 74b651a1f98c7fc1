"""The names a model's parts and their metrics go by in parameter trees, checkpoints, metrics and messages: one
function each, so that a module's name in a run directory, in the train state and in a message cannot drift apart,
and training and evaluation log a group's metrics under the same keys."""


def module_name(k: int) -> str:
  """Module k of a model: its subtree of the parameters, and its item under a run's modules/."""
  return f"module_{k}"


def teacher_name(k: int) -> str:
  """The teacher's module k among the frozen modules an incubation step receives (m2mKD)."""
  return f"teacher_{k}"


def metric_name(group: str, metric: str) -> str:
  """A metric of one group of a step (`module_k` of an incubation), as training and evaluation both log it:
  `module_2/loss`, `module_2/top1`, `module_2/kl`."""
  return f"{group}/{metric}"
