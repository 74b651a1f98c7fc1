"""What a run directory records about its run, and what a resume may change.

    WORKDIR/run.json      what the run is: phase, preset, architecture ("arch"), depths, modules
    WORKDIR/config.json   the resolved config it was started with
    WORKDIR/results.json  written last: its presence marks the run finished
"""

from __future__ import annotations

import json

from modassem import files, phases
from modassem.errors import ModassemError
from modassem.models.presets import ARCH_FIELDS

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"

# Config fields that change how a run logs, evaluates, checkpoints, places its arrays or finds its data, but not
# what it trains: a resume may change them freely. Every other field must stay as the run was started.
FREE_FIELDS = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "progress",
    "eval_batch_size", "sharding", "model.remat", "model.attention",
    "data.path", "data.tfds_data_dir", "data.manual_dir", "data.download", "data.prefetch", "data.eval_split",
    "data.eval_crop_ratio",
})


# Config fields added after runs could already be started: a config.json without one was written by a run that
# had this value (so resuming it with the value is no change). The one place that knows about older runs' configs:
# every reader of a config.json goes through `recorded_config`; live configs have every field from their preset
# (configs/common.py, modassem.data.default_config) and the code reads them without fallbacks.
ADDED_FIELDS = {"teacher": "", "distill.alpha": 0.5, "distill.tau": 1.0, "stitch": False, "mixup_group": 0,
                "allow_mixed_meta": False, "model.moe.experts": 0, "model.moe.k": 2, "model.moe.every": 1,
                "model.moe.blocks": [], "model.moe.router": "topk_softmax", "model.moe.capacity_factor": 0.0,
                "model.moe.noise_std": 0.0, "model.moe.aux_weight": 0.0,
                "incubation_drop_path": "hybrid"}
# Fields that name other runs: recorded absolute (`files.absolute`).
PATH_FIELDS = ("meta", "modules", "teacher")


def arch_of(config, **overrides) -> dict:
  """run.json's "arch": what modules must agree on to be exchanged, with `overrides` (a meta model's width, say; a
  field set to None is left out). "moe" only for a sparse model: the MoE MLP and, as "layout", which blocks of
  each module have it (indices within the module), all that building its modules needs (`vit.vit_of`)."""
  arch = {f: config.model[f] for f in ARCH_FIELDS}
  spec, layout = phases.moe_of(config)
  if spec is not None:
    arch["moe"] = {"experts": spec.experts, "k": spec.k, "router": spec.router,
                   "capacity_factor": spec.capacity_factor, "layout": [list(blocks) for blocks in layout]}
  return {k: v for k, v in {**arch, **overrides}.items() if v is not None}


def module_arch(arch: dict, k: int) -> dict:
  """What module k of a run of `arch` must agree on with the model it goes into: the architecture, with the MoE
  layout of slot k alone (a module's own blocks are what its parameters are; an imported incubation run knows only
  its module's)."""
  moe = arch.get("moe")
  if not moe or not isinstance(moe.get("layout"), list) or not 0 <= k < len(moe["layout"]):
    return arch
  return {**arch, "moe": {**moe, "layout": moe["layout"][k]}}


def arch_difference(theirs: dict, ours: dict) -> str:
  """The fields of `ours` that `theirs` has otherwise, as "field theirs vs ours, ..." ("" where none)."""
  fields = list(ours) + [f for f in theirs if f not in ours]   # "moe" may be on one side only
  return ", ".join(f"{f} {theirs.get(f)} vs {ours.get(f)}" for f in fields if theirs.get(f) != ours.get(f))


def check_not_a_file(workdir: str) -> None:
  """A run directory must be a directory (or not exist yet)."""
  wd = files.path(workdir)
  above = next((p for p in wd.parents if p.exists()), None)
  if above is not None and not above.is_dir():
    raise ModassemError(f"--workdir={workdir} lies under {above}, which is a file: pass a directory path that no "
                        "file stands in the way of")
  if wd.exists() and not wd.is_dir():
    raise ModassemError(f"--workdir={workdir} is a file, not a directory: pass a new directory for this run, or "
                        "the run directory to resume or evaluate")


def check_workdir(workdir: str, run: dict) -> dict | None:
  """The run already in `workdir`, if it is this run; an error if it is another."""
  old = files.read_json(files.path(workdir) / RUN_FILE)
  if old is None:
    return None
  for key, what in (("phase", "phase"), ("preset", "preset"), ("arch", "architecture"),
                    ("depths", "module depths"), ("trained", "trained modules")):
    if old.get(key) != run[key]:
      raise ModassemError(
          f"{workdir} holds a run (phase {old.get('phase')}) whose {what} is {old.get(key)}, not {run[key]}: "
          f"use a new --workdir for this run, or the config that made it to resume it")
  # The train state is saved in the model's parameter layout, which model.scan sets.
  if bool(old.get("scan", False)) != bool(run.get("scan", False)):
    raise ModassemError(f"{workdir} holds a run trained with model.scan={bool(old.get('scan', False))}, whose "
                        f"checkpoints are in that parameter layout: resume or evaluate it with "
                        f"--config.model.scan={bool(old.get('scan', False))}")
  return old


def config_record(config) -> dict:
  """The resolved config as plain JSON values (what `config.json` holds)."""
  return json.loads(json.dumps(config.to_dict()))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def recorded_config(workdir) -> dict | None:
  """The config the run in `workdir` was started with (its config.json) as flat fields ("optim.lr"), the fields
  older runs lack filled in as those runs behaved (`ADDED_FIELDS`); None where there is no config.json."""
  old = files.read_json(files.path(workdir) / CONFIG_FILE)
  return None if old is None else {**ADDED_FIELDS, **_flat(old)}


def check_config(workdir: str, config, allow_changed=()) -> list[str]:
  """The fields of `config` that differ from the `config.json` the run in `workdir` was started with.

  A difference in a field that changes what is trained is an error naming
  the field and both values, unless `allow_changed` names it; `FREE_FIELDS`
  may differ. Returns the fields that differ (free or allowed).
  """
  old = recorded_config(workdir)
  new = _flat(config_record(config))
  unknown = [f for f in allow_changed if f not in new]
  if unknown:
    raise ModassemError(f"--allow_changed={unknown[0]} names no config field: give fields as in "
                        f"--config.FIELD, e.g. --allow_changed=optim.lr")
  if old is None:
    return []
  missing = object()
  # Runs of older versions recorded run paths as typed, relative to where their command ran (as a resume runs).
  old.update({f: files.absolute(old[f]) for f in PATH_FIELDS if isinstance(old.get(f), str)})
  changed = sorted(f for f in set(old) | set(new) if old.get(f, missing) != new.get(f, missing))
  refused = [f for f in changed if f not in FREE_FIELDS and f not in allow_changed]
  if refused:
    f = refused[0]
    show = lambda v: "(none)" if v is missing else json.dumps(v)
    more = f" ({len(refused) - 1} more field(s) differ: {', '.join(refused[1:4])})" if len(refused) > 1 else ""
    raise ModassemError(
        f"{workdir} was started with {f}={show(old.get(f, missing))}, this config has {f}={show(new.get(f, missing))}"
        f"{more}: resume with the config the run was started with (its {CONFIG_FILE}), use a new --workdir, or pass "
        f"--allow_changed={','.join(refused)} to continue with the new values")
  return changed
