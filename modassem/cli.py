"""`modassem VERB --config=FILE[:PHASE] [--config.FIELD=VALUE ...] --workdir=DIR`.

Verbs:
  train     train (or resume) one phase: meta, incubate, assemble or e2e
  eval      evaluate the latest checkpoint of a run on the held-out split
  pipeline  meta -> incubate all -> assemble, plus the e2e baseline at equal
            training FLOPs, then a report (report.md, report.json, curves.png)
  convert   --from=FILE.pth --to=RUNDIR [--preset=NAME | --heads=N [--ln_eps=E]]:
            import an official PyTorch checkpoint (meta model, incubated
            module or final model; --heads for an architecture no preset has);
            --from=RUNDIR --to=FILE.pth: export a run in the official layout
  report    RUN [RUN ...] [--out=DIR]: report.md, report.json and curves.png
            of the method's runs however they were made: the assembly run
            (its incubation and meta runs are found from it; two for m2mKD
            against plain incubation) and the e2e run to compare with
  plan      --config=FILE [--num_train=N] [--out=FILE.json]: training FLOPs of
            every phase from the lowered steps (no data, no parameters), the
            method against e2e, beside the paper's GPU-hour ratio
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import traceback

from modassem import flags

VERBS = ("train", "eval", "pipeline", "convert", "plan", "report")


def _convert(argv: list[str]) -> int:
  """`convert`: its own three flags, and torch only once a .pth is read or written."""
  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  fv = flags.convert_flags()
  try:
    fv(["modassem"] + argv)
  except flags.parse_errors() as e:
    return flags.fail("convert", str(e))
  from modassem import convert  # pylint: disable=g-import-not-at-top
  try:
    print(convert.convert(fv["from"].value, fv.to, fv.preset, fv.heads, fv.ln_eps), flush=True)
  except ModassemError as e:
    return flags.fail("convert", str(e))
  return 0


def _report(argv: list[str]) -> int:
  """`report RUN [RUN ...] [--out=DIR]`."""
  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  fv = flags.report_flags()
  try:
    runs = fv(["modassem"] + argv)[1:]
  except flags.parse_errors() as e:
    return flags.fail("report", str(e))
  if not runs:
    return flags.fail("report", "no runs given: pass the run directories, e.g. modassem report runs/demo/asm "
                      "runs/demo/e2e (the assembly's incubation and meta runs are found from it)")
  from modassem import files, report  # pylint: disable=g-import-not-at-top
  try:
    out = fv.out or report.common_parent(runs)
    result = report.write(runs, out)
  except ModassemError as e:
    return flags.fail("report", str(e))
  print(report.report_markdown(result), flush=True)
  print(f"wrote {files.join(out, 'report.md')}, report.json and curves.png", flush=True)
  return 0


def verb_help(verb: str) -> str:
  """`modassem VERB --help`: the verb's paragraph of the overview and its flags."""
  lines, keep = [], False
  for line in __doc__.split("Verbs:")[1].splitlines():
    if line.startswith("  ") and not line.startswith("   "):
      keep = line.split()[0] == verb
    if keep:
      lines.append(line.strip())
  if verb == "convert":
    fv = flags.convert_flags()
  elif verb == "report":
    fv = flags.report_flags()
  elif verb == "plan":
    from modassem import cost  # pylint: disable=g-import-not-at-top
    fv = cost._flags([], parse=False)  # pylint: disable=protected-access
  else:
    fv = flags.run_flags([], parse=False)
  flags_ = {f.name: f for f in fv._flags().values()}  # pylint: disable=protected-access
  out = [f"modassem {verb}: " + " ".join(lines)[len(verb):].strip(), "", "flags:"]
  out += [f"  --{name}: {flags_[name].help}" for name in sorted(flags_)]
  if verb not in ("convert", "report"):
    out.append("  --config.FIELD=VALUE: override a field of the config, e.g. --config.batch_size=256")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  """Runs one verb; returns the exit status: 0, 2 for a bad command or input (one line on stderr), 1 for a bug."""
  argv = list(sys.argv[1:] if argv is None else argv)
  verb = argv[0] if argv else ""
  try:
    return _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, OSError) and e.filename is not None:
      # A path the user gave that cannot be read or written: theirs to fix, not a bug.
      return flags.fail(verb, f"{e.strerror or e}: {e.filename}: check the path and its permissions")
    # Everything else a user can cause is a ModassemError by now, so this is a bug in modassem.
    traceback.print_exc()
    print(f"modassem {verb}: internal error: this is a bug in modassem, not in your command; please report it "
          "with the command line and the traceback above", file=sys.stderr, flush=True)
    return 1


def _main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return 0
  verb, rest = argv[0], argv[1:]
  if verb not in VERBS:
    return flags.fail(verb, f"unknown verb {verb!r}: use one of {', '.join(VERBS)} (modassem --help)")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if any(a in ("-h", "--help", "-help") for a in rest):
    print(verb_help(verb))
    return 0
  if verb == "convert":
    return _convert(rest)
  if verb == "report":
    return _report(rest)
  if verb == "plan":
    from modassem import cost  # pylint: disable=g-import-not-at-top
    return cost.main(rest)

  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  try:
    fv = flags.run_flags(rest, phased=verb != "pipeline")
  except flags.parse_errors() as e:
    return flags.fail(verb, flags.parse_error_message(rest, e))

  try:
    from modassem import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id, auto=fv.distributed)
    return _run(verb, fv)
  except ModassemError as e:
    return flags.fail(verb, str(e))
  except KeyboardInterrupt:
    from modassem import preempt  # pylint: disable=g-import-not-at-top
    print(f"modassem {verb}: interrupted: stopped at once, without a checkpoint; rerun the same command to resume "
          "from the last one", file=sys.stderr, flush=True)
    return preempt.EXIT_INTERRUPTED


def _run(verb: str, fv) -> int:
  """A verb that trains or evaluates, with SIGTERM and SIGINT turned into a checkpoint and `EXIT_PREEMPTED`."""
  from modassem import distributed, preempt  # pylint: disable=g-import-not-at-top
  try:
    with preempt.handling():
      _verb(verb, fv)
  except preempt.Preempted as e:
    if distributed.is_main():
      print(f"modassem {verb}: {e}", file=sys.stderr, flush=True)
    return preempt.EXIT_PREEMPTED
  return 0


def _verb(verb: str, fv) -> None:
  from modassem import records  # pylint: disable=g-import-not-at-top
  records.check_not_a_file(fv.workdir)
  if verb == "train":
    from modassem import train  # pylint: disable=g-import-not-at-top
    train.train(fv.config, fv.workdir, allow_changed=fv.allow_changed)
  elif verb == "eval":
    from modassem import train  # pylint: disable=g-import-not-at-top
    result = train.evaluate_run(fv.config, fv.workdir)
    print(json.dumps(result, sort_keys=True))
  elif verb == "pipeline":
    from modassem import pipeline  # pylint: disable=g-import-not-at-top
    spec, overrides = flags.config_spec(fv)
    pipeline.run(spec, overrides, fv.workdir, compare_plain=fv.compare_plain)


def quick_tensorflow_import() -> None:
  """Lets `import tensorflow` skip Keras, which modassem never uses.

  TensorFlow imports the whole of Keras at `import tensorflow` (and Keras imports scikit-learn and SciPy where they
  are installed): about 1.5 s of every run's start on a 2-core machine. It skips that import when told that Keras is
  the legacy `tf_keras` package and that package is absent. The command line's process is modassem's own and uses
  tf.data only, so it says so there, unless the environment has decided already or `tf_keras` is installed (where
  the variable would change what `tf.keras` is). `import modassem` in a user's program leaves TensorFlow as it is."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if "tensorflow" not in sys.modules and importlib.util.find_spec("tf_keras") is None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def collect_less() -> None:
  """Runs Python's cyclic garbage collector less often in the command line's process.

  Tracing and lowering a model allocates millions of short-lived objects, and at the default threshold (a young
  collection every 700 allocations, each one also walking whatever survived the last) a tenth of a short run's CPU
  time went to collections that found almost nothing: 0.9 of 7.4 s to import, set up and compile the tiny preset's
  step on this 2-core machine, 0.2 s at 10,000. Reference counting still frees what is not in a cycle at once; the
  older generations keep their defaults. A user's own process (`import modassem`) keeps its settings.

  And the process ends without the collections Python runs as it shuts down: an exit handler (they run once the
  threads that are not daemons have been joined) freezes everything still alive out of the collector's reach
  (`gc.freeze`), so the final collections do not walk the millions of objects that TensorFlow's import and the
  traced programs left: 0.9 CPU s of a 6.7 s process that sets up and compiles the tiny preset's step, 0.1 s frozen.
  Reference counting still frees what it frees; objects kept alive by cycles alone are left to the operating system,
  which Python allows (it does not promise to finalize what is alive at exit): the command line closes its files,
  writers and checkpoint managers itself."""
  gc.set_threshold(10_000)
  # What the other exit handlers free, before or after this one, is still freed, by reference counting.
  atexit.register(gc.freeze)


def entry() -> None:
  collect_less()
  quick_tensorflow_import()
  sys.exit(main())


if __name__ == "__main__":
  entry()
