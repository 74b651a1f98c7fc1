"""The names a model's parts go by in parameter trees, checkpoints and messages: one function each, so that a
module's name in a run directory, in the train state and in a message cannot drift apart."""


def module_name(k: int) -> str:
  """Module k of a model: its subtree of the parameters, and its item under a run's modules/."""
  return f"module_{k}"


def teacher_name(k: int) -> str:
  """The teacher's module k among the frozen modules an incubation step receives (m2mKD)."""
  return f"teacher_{k}"
