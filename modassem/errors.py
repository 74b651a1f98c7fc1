"""The one exception type users see.

Anything raised as `ModassemError` is a problem with the user's input (a path,
a checkpoint, a config field). The CLI prints its message as a single line and
exits non-zero; every other exception is a bug and keeps its traceback.
"""

import re

# Terminal escape sequences (colours, bold) that a library's message may carry (PyTorch's refusals do).
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")


def plain(text) -> str:
  """`text` as one line of plain text: escape sequences dropped, each run of whitespace (newlines too) one space."""
  return " ".join(_ESCAPES.sub("", str(text)).split())


class ModassemError(Exception):
  """A user-facing error whose message says what is wrong and what to do."""

  def __init__(self, message: str):
    # One line of plain text, always: multi-line messages get lost in launcher logs, escapes garble them.
    super().__init__(plain(message))
