"""Command-line flags shared by every verb: `--config=FILE[:PHASE]` with its typed `--config.FIELD=VALUE`
overrides (absl + ml_collections), and how a parse error becomes the one-line `modassem VERB: error: ...`.

Both the CLI and the cost report parse through here, so a flag means the same
thing, and fails the same way, whichever verb reads it.
"""

from __future__ import annotations

import re
import sys

from modassem.errors import ModassemError, plain


def fail(verb: str, message: str) -> int:
  """Prints `modassem VERB: error: MESSAGE` on one line; returns the exit status, 2."""
  print(f"modassem {verb}: error: {plain(message)}", file=sys.stderr, flush=True)
  return 2


def config_flag_values(argv: list[str], example: str, phased: bool = True):
  """Flags with `--config=FILE[:ARG]` and its typed `--config.x.y=v` overrides.

  The file is loaded once to check it (`phased=False`: a several-phase verb, checked with its default phase). The
  caller defines its own flags on the result, then parses `["modassem"] + argv`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from modassem import config as config_lib  # pylint: disable=g-import-not-at-top

  for arg in argv:
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
      # ml_collections loads the file lazily and folds a failure into a traceback inside a flag error; loading it
      # here first turns a missing file, a broken one or an unknown phase into one line before anything else runs.
      path, phase = config_lib.split_spec(spec)
      if not phased and phase is not None:
        raise ModassemError(f"--config={spec}: this verb runs every phase of {path}, each as {path}:PHASE; pass "
                            f"--config={path}")
      config_lib.load(spec)
  fv = flags.FlagValues()
  # sys_argv: the overrides are found in `argv`, not in sys.argv, so `main(argv)` works in-process.
  config_flags.DEFINE_config_file("config", None, f"config file, e.g. {example}", flag_values=fv,
                                  lock_config=True, sys_argv=["modassem"] + argv)
  return fv


def config_spec(fv) -> tuple[str, dict]:
  """(`FILE[:PHASE]`, {field: value}) of a parsed `--config` and its overrides."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.get_config_filename(fv["config"]), config_flags.get_override_values(fv["config"])


def run_flags(argv: list[str], parse: bool = True, phased: bool = True):
  """`train`, `eval` and `pipeline`: `--config` with its overrides, `--workdir`, and the multi-process flags.

  `parse=False` only defines them (for `--help`).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = config_flag_values(argv, "configs/vit_b.py:meta", phased)
  flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process run", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes in a multi-process run", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "multi-process run on a TPU pod or SLURM cluster: JAX finds the "
                    "coordinator itself", flag_values=fv)
  flags.DEFINE_list("allow_changed", [], "train: config fields a resume may change from the run's config.json, "
                    "e.g. optim.lr,total_steps", flag_values=fv)
  flags.DEFINE_bool("compare_plain", False, "pipeline with --config.teacher: also incubate without the teacher and "
                    "assemble that, reported side by side", flag_values=fv)
  if not parse:
    return fv
  fv(["modassem"] + argv)
  if not fv["config"].present:
    raise ValueError("--config is required, e.g. --config=configs/demo.py:meta")
  if not fv.workdir:
    raise ValueError("--workdir is required: the run directory to write (or resume, or read)")
  return fv


def convert_flags():
  """`convert` takes no config: `--from`, `--to`, and `--preset` or `--heads`/`--ln_eps`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string("from", None, "official .pth checkpoint, or run directory to export", flag_values=fv)
  flags.DEFINE_string("to", None, "run directory to write, or .pth file to export to", flag_values=fv)
  flags.DEFINE_string("preset", None, "preset giving heads and LayerNorm eps (found from the shapes if not given)",
                      flag_values=fv)
  flags.DEFINE_integer("heads", None, "attention heads of a checkpoint that no preset matches", flag_values=fv)
  flags.DEFINE_float("ln_eps", None, "LayerNorm eps of a checkpoint that no preset matches (default 1e-6, the "
                     "official code's)", flag_values=fv)
  return fv


def report_flags():
  """`report` takes run directories and `--out`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "folder for report.md, report.json and curves.png (default: the folder that "
                      "holds the runs)", flag_values=fv)
  return fv


def parse_errors() -> tuple:
  """The exceptions a bad command line raises (`except flags.parse_errors() as e:`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  # absl's own errors; ml_collections raises KeyError/AttributeError for an unknown field, TypeError and
  # ValueError for a value of the wrong type; loading the config file may raise ModassemError.
  return (flags.Error, ValueError, KeyError, AttributeError, TypeError, ModassemError)


def unknown_field(argv: list[str], text: str) -> str | None:
  """The `--config.FIELD=...` override that a parse error about one key is about: the one whose name, or one of
  its dotted parts, the error quotes (ml_collections quotes it once or twice, depending on the path taken)."""
  for arg in argv:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      if any(f"'{part}'" in text or f"\"{part}\"" in text for part in field.split(".")):
        return field
  return None


def parse_error_message(argv: list[str], e: Exception) -> str:
  """What to tell the user about an exception raised while parsing `argv`."""
  text = str(e.args[0] if isinstance(e, (KeyError, AttributeError)) and e.args else e)
  text = text.replace("\\n", "\n").replace("\\'", "'")
  if isinstance(e, (KeyError, AttributeError)) or "not found" in text.lower() or "did you mean" in text.lower():
    field = unknown_field(argv, text)
    if field is not None:
      near = re.search(r'Did you mean "([^"]+)"', text)
      hint = f" (did you mean {near.group(1)!r}?)" if near else ""
      return f"unknown config field {field!r}{hint}: see the preset file and configs/common.py for the fields"
  return text
