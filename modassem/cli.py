"""`modassem VERB --config=FILE[:PHASE] [--config.FIELD=VALUE ...] --workdir=DIR`.

Verbs:
  train     train (or resume) one phase: meta, incubate, assemble or e2e
  eval      evaluate the latest checkpoint of a run on the held-out split
  pipeline  meta -> incubate all -> assemble, plus the e2e baseline at equal
            training FLOPs, then a report (report.md, report.json, curves.png)
  convert   --from=FILE.pth --to=RUNDIR [--preset=NAME]: import an official
            PyTorch checkpoint (meta model, incubated module or final model);
            --from=RUNDIR --to=FILE.pth: export a run in the official layout
  plan      --config=FILE [--num_train=N] [--out=FILE.json]: training FLOPs of
            every phase from the compiled steps (no data, no parameters), the
            method against e2e, beside the paper's GPU-hour ratio
"""

from __future__ import annotations

import json
import os
import sys

VERBS = ("train", "eval", "pipeline", "convert", "plan")


def _fail(verb: str, message: str) -> int:
  print(f"modassem {verb}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  return 2


def config_flag_values(argv: list[str], example: str):
  """Flags with `--config=FILE[:ARG]` and its typed `--config.x.y=v` overrides (absl + ml_collections).

  The caller defines its own flags on the result, then parses `["modassem"] + argv`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from modassem import config as config_lib  # pylint: disable=g-import-not-at-top

  for arg in argv:
    if arg.startswith("--config="):
      config_lib.add_config_dir(config_lib.split_spec(arg.split("=", 1)[1])[0])
  fv = flags.FlagValues()
  # sys_argv: the overrides are found in `argv`, not in sys.argv, so `main(argv)` works in-process.
  config_flags.DEFINE_config_file("config", None, f"config file, e.g. {example}", flag_values=fv,
                                  lock_config=True, sys_argv=["modassem"] + argv)
  return fv


def _parse(verb: str, argv: list[str], parse: bool = True):
  """`--config` with its overrides, `--workdir`, and the multi-process flags (`parse=False`: defined only)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = config_flag_values(argv, "configs/vit_b.py:meta")
  flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process run", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes in a multi-process run", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "multi-process run on a TPU pod or SLURM cluster: JAX finds the "
                    "coordinator itself", flag_values=fv)
  if not parse:
    return fv
  fv(["modassem"] + argv)
  if not fv["config"].present:
    raise ValueError("--config is required, e.g. --config=configs/demo.py:meta")
  if not fv.workdir:
    raise ValueError("--workdir is required: the run directory to write (or resume, or read)")
  return fv


def _convert_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string("from", None, "official .pth checkpoint, or run directory to export", flag_values=fv)
  flags.DEFINE_string("to", None, "run directory to write, or .pth file to export to", flag_values=fv)
  flags.DEFINE_string("preset", None, "preset giving heads and LayerNorm eps (found from the shapes if not given)",
                      flag_values=fv)
  return fv


def _convert(argv: list[str]) -> int:
  """`convert` takes no config: its own three flags, and torch only once a .pth is read or written."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  fv = _convert_flags()
  try:
    fv(["modassem"] + argv)
    from modassem import convert  # pylint: disable=g-import-not-at-top
    print(convert.convert(fv["from"].value, fv.to, fv.preset), flush=True)
  except (flags.Error, ModassemError) as e:
    return _fail("convert", str(e))
  return 0


def _unknown_field(argv: list[str], text: str) -> str | None:
  """The `--config.FIELD=...` override that a parse error naming one key (`'no_such'`) is about."""
  name = text.strip("'\" ").split("'")[0]
  for arg in argv:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      if name in field.split("."):
        return field
  return None


def verb_help(verb: str) -> str:
  """`modassem VERB --help`: the verb's paragraph of the overview and its flags."""
  lines, keep = [], False
  for line in __doc__.split("Verbs:")[1].splitlines():
    if line.startswith("  ") and not line.startswith("   "):
      keep = line.split()[0] == verb
    if keep:
      lines.append(line.strip())
  if verb == "convert":
    fv = _convert_flags()
  elif verb == "plan":
    from modassem import plan  # pylint: disable=g-import-not-at-top
    fv = plan._parse([], parse=False)  # pylint: disable=protected-access
  else:
    fv = _parse(verb, [], parse=False)
  flags_ = {f.name: f for f in fv._flags().values()}  # pylint: disable=protected-access
  out = [f"modassem {verb}: " + " ".join(lines)[len(verb):].strip(), "", "flags:"]
  out += [f"  --{name}: {flags_[name].help}" for name in sorted(flags_)]
  if verb != "convert":
    out.append("  --config.FIELD=VALUE: override a field of the config, e.g. --config.batch_size=256")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return 0
  verb, rest = argv[0], argv[1:]
  if verb not in VERBS:
    return _fail("", f"unknown verb {verb!r}: use one of {', '.join(VERBS)} (modassem --help)")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if any(a in ("-h", "--help", "-help") for a in rest):
    print(verb_help(verb))
    return 0
  if verb == "convert":
    return _convert(rest)
  if verb == "plan":
    from modassem import plan  # pylint: disable=g-import-not-at-top
    return plan.main(rest)

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  try:
    fv = _parse(verb, rest)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, ModassemError) as e:
    text = str(e.args[0] if isinstance(e, (KeyError, AttributeError)) and e.args else e)
    field = _unknown_field(rest, text)
    if field is not None:
      hint = f" ({text[text.find('Did you mean'):].rstrip('?')})" if "Did you mean" in text else ""
      text = f"unknown config field {field!r}{hint}: see the preset file and configs/common.py for the fields"
    elif "config" in text and ("not found" in text.lower() or "could not override" in text.lower()
                             or "unknown" in text.lower() or "doesn't exist" in text.lower()):
      text = f"unknown config field: {text}; see the preset file and configs/common.py for the fields"
    return _fail(verb, text)

  try:
    from modassem import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id, auto=fv.distributed)
    if verb == "train":
      from modassem import train  # pylint: disable=g-import-not-at-top
      train.train(fv.config, fv.workdir)
    elif verb == "eval":
      from modassem import train  # pylint: disable=g-import-not-at-top
      result = train.evaluate_run(fv.config, fv.workdir)
      print(json.dumps(result, sort_keys=True))
    elif verb == "pipeline":
      from modassem import pipeline  # pylint: disable=g-import-not-at-top
      spec = config_flags.get_config_filename(fv["config"])
      overrides = config_flags.get_override_values(fv["config"])
      pipeline.run(spec, overrides, fv.workdir)
  except ModassemError as e:
    return _fail(verb, str(e))
  except KeyboardInterrupt:
    return _fail(verb, "interrupted; rerun the same command to resume from the last checkpoint")
  return 0


def entry() -> None:
  sys.exit(main())


if __name__ == "__main__":
  entry()
