"""The one exception type users see.

Anything raised as `ModassemError` is a problem with the user's input (a path,
a checkpoint, a config field). The CLI prints its message as a single line and
exits non-zero; every other exception is a bug and keeps its traceback.
"""


class ModassemError(Exception):
  """A user-facing error whose message says what is wrong and what to do."""

  def __init__(self, message: str):
    # One line, always: multi-line messages get lost in launcher logs.
    super().__init__(" ".join(str(message).split()))
