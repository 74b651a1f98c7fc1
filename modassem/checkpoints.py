"""What a run directory holds, and how phases hand modules to each other.

    WORKDIR/run.json               what the run is: phase, preset, architecture, depths, modules
    WORKDIR/checkpoints/<step>/    Orbax CheckpointManager: the whole train state, for resuming
    WORKDIR/modules/module_<k>/    one Orbax item per trained module, written when the run ends
    WORKDIR/metrics.jsonl, results.json, tb/

Each checkpoint step and module carries its files' digests (modassem.digests), checked before it is read: a step
that fails them is damaged like one cut short (moved aside, the one before used), a module is refused in one line.

A later phase reads `modules/module_<k>` alone: incubation loads the meta
run's modules, assembly loads module i of incubation run i, and neither touches
the optimizer state of the runs they read.
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from modassem import damage, digests, files, records
from modassem.errors import ModassemError
from modassem.names import module_name

def state_dir(workdir) -> files.Path:
  return files.path(workdir) / "checkpoints"


def saved_steps(workdir) -> list[int]:
  """The steps of the run's checkpoint folders under checkpoints/ (whole or not), newest first."""
  d = state_dir(workdir)
  return sorted((int(p.name) for p in d.iterdir() if p.name.isdigit()), reverse=True) if d.is_dir() else []


class Manager(ocp.CheckpointManager):
  """Orbax's manager, sealing each step it saves (`digests.seal`) once Orbax has committed it: every save, restore
  or close first waits for Orbax's commit (`wait_until_finished`); the digest pass of the steps committed by then
  starts there, in a thread beside the next train steps, and the next wait joins it. Process 0 seals them all."""

  def __init__(self, *args, **kwargs):
    self._to_seal, self._sealing, self._sealing_error = [], None, None
    super().__init__(*args, **kwargs)

  def save(self, step, *args, **kwargs):
    saved = super().save(step, *args, **kwargs)
    if saved and jax.process_index() == 0:
      self._to_seal.append(step)
    return saved

  def _join_sealing(self):
    if self._sealing is not None:
      self._sealing.join()
      self._sealing = None
    error, self._sealing_error = self._sealing_error, None
    if error is not None:
      raise error

  def _seal(self, folders):
    for folder in folders:
      try:
        digests.seal(folder)
      except BaseException as e:  # pylint: disable=broad-except  (raised in the thread that joins this one)
        if folder.is_dir():   # else removed meanwhile (keep_checkpoints, or a diverged run's steps): nothing to seal
          self._sealing_error = e
          return

  def wait_until_finished(self):
    self._join_sealing()
    super().wait_until_finished()
    if self._to_seal:
      folders, self._to_seal = [files.path(self.directory) / str(step) for step in self._to_seal], []
      sealing = threading.Thread(target=self._seal, args=(folders,), name="modassem-digests", daemon=True)
      # Kept once started: a second Ctrl-C can land inside start(), and a thread never started cannot be joined.
      sealing.start()
      self._sealing = sealing

  def wait_for_digests(self):
    """Waits for a save in flight, then for the digest pass of every step saved so far."""
    self.wait_until_finished()
    self._join_sealing()

  def close(self):
    super().close()
    self._join_sealing()


def manager(workdir: str, config) -> Manager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True,
      create=True,
      # A save cut off (a full disk, a kill) leaves its temporary folder: Orbax never reads it, and removing it
      # when the run starts again gives back the space it holds.
      cleanup_tmp_directories=True,
  )
  return Manager(state_dir(workdir), options=options, item_names=("state",))


def save_state(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores into `abstract_state` (ShapeDtypeStructs with shardings), so arrays land where the step wants them."""
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def newest_sound_step(workdir: str, mngr: Manager, say=print) -> int | None:
  """The newest checkpoint step whose files match their digests (None if there is none); those newer that do not
  are moved aside. For naming the step a rerun resumes from without reading it."""
  mngr.wait_for_digests()
  for step in sorted(mngr.all_steps(), reverse=True):
    why = damage.digest_damage(state_dir(workdir) / str(step))
    if damage.all_processes_agree(why is None):
      mngr.reload()
      return step
    for dest in damage.move_aside_together(workdir, [state_dir(workdir) / str(step)]):
      say(f"{workdir}: checkpoint {step} is damaged ({why}): moved it to {dest}")
  mngr.reload()
  return None


def restore_newest_intact(workdir: str, mngr: ocp.CheckpointManager, abstract_state, say=print):
  """(state, step) of the newest checkpoint that reads back whole, or (None, None) when there is none yet.

  A damaged checkpoint newer than it (a data file cut short, its metadata or
  a process folder gone: a machine lost mid-write by a filesystem that does not
  rename atomically) is moved to `WORKDIR/damaged/`, never deleted, and said
  so. Where every checkpoint is damaged, nothing is moved and the error says
  what to do.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    state, error = None, damage.digest_damage(state_dir(workdir) / str(step))
    if error is None:
      try:
        with damage.quietly_failing():
          state = restore_state(mngr, step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many types)
        error = type(e).__name__
    if damage.all_processes_agree(error is None):
      break
    damaged.append((step, error or "damaged on another process"))
  else:
    if not steps:
      return None, None
    raise ModassemError(
        f"every checkpoint in {state_dir(workdir)} (step(s) {', '.join(str(s) for s in steps)}) is damaged "
        f"({damaged[0][1]}): move that folder away to start the run over, or restore it from a copy")
  if damaged:
    moved = damage.move_aside_together(workdir, [state_dir(workdir) / str(bad) for bad, _ in damaged])
    for (bad, why), dest in zip(damaged, moved):
      say(f"{workdir}: checkpoint {bad} is damaged ({why}): moved it to {dest}; using checkpoint {step}")
    mngr.reload()
  return state, step


def module_dir(run_dir, k: int) -> files.Path:
  return files.path(run_dir) / "modules" / module_name(k)


def save_modules(workdir: str, params: dict) -> None:
  """One standalone Orbax item per module in `params`, each sealed with its files' digests."""
  ckptr = ocp.StandardCheckpointer()
  folders = {name: module_dir(workdir, int(name.split("_")[-1])) for name in params}
  for name, tree in params.items():
    ckptr.save(folders[name], tree, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    for folder in folders.values():
      digests.seal(folder)


def _saved_shapes(ckptr, path):
  """The shapes and dtypes of an Orbax item, from its metadata (no array is read)."""
  meta = ckptr.metadata(path)
  return getattr(meta.item_metadata, "tree", meta.item_metadata)


def _on_this_host(tree):
  """ShapeDtypeStructs of `tree`'s leaves; those without a placement go to this process's first device."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  placed = lambda a: isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None
  return jax.tree_util.tree_map(
      lambda a: a if placed(a) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), tree)


def module_intact(run_dir: str, k: int) -> bool:
  """Whether module k's item in `run_dir` is there and reads back whole (every array, not only its metadata)."""
  path = module_dir(run_dir, k)
  if not path.is_dir() or damage.digest_damage(path) is not None:
    return False
  ckptr = ocp.StandardCheckpointer()
  try:
    with damage.quietly_failing():
      ckptr.restore(path, _on_this_host(_saved_shapes(ckptr, path)))
  except Exception:  # pylint: disable=broad-except  (Orbax and TensorStore raise many types for a damaged item)
    return False
  return True


def load_module(run_dir: str, k: int, *, expect: dict, abstract: Any, what: str) -> Any:
  """Module k of the finished run in `run_dir`, checked against what the caller expects.

  `expect` holds the run.json fields that must agree (preset, arch, depth of
  slot k); `abstract` the ShapeDtypeStructs (with shardings) to restore into.
  """
  if not run_dir:
    raise ModassemError(f"no {what} given: pass it on the command line")
  if not files.path(run_dir).is_dir():
    raise ModassemError(f"{what} {run_dir!r} does not exist: pass the --workdir of a finished run")
  run = files.read_json(files.path(run_dir) / records.RUN_FILE)
  if run is None:
    raise ModassemError(f"{what} {run_dir!r} has no {records.RUN_FILE}: it is not a modassem run directory")
  theirs, ours = records.module_arch(run.get("arch", {}), k), records.module_arch(expect["arch"], k)
  if theirs != ours:
    detail = records.arch_difference(theirs, ours)
    stitchable = what == "meta run" and run.get("arch", {}).get("width") != expect["arch"]["width"]
    raise ModassemError(f"{what} {run_dir!r} (preset {run.get('preset')}) has another architecture than this config "
                        f"({detail}): pass a run made with the same preset and model settings"
                        + (", or set --config.stitch=True to join modules of another width to its meta model with "
                           "stitch layers" if stitchable else ""))
  if len(run.get("depths", [])) != expect["num_modules"]:
    raise ModassemError(f"{what} {run_dir!r} has {len(run.get('depths', []))} modules, this config "
                        f"{expect['num_modules']}: use a run with model.num_modules={expect['num_modules']}")
  if k not in run.get("trained", []):
    raise ModassemError(f"{what} {run_dir!r} ({run.get('phase')} run of module(s) {run.get('trained')}) "
                        f"did not train module {k}: pass a run that did")
  depth = run["depths"][k]
  if depth != expect["depth"]:
    kind = "a meta run" if expect["depth"] == 1 else "an incubation run with the same model.depths"
    raise ModassemError(f"{what} {run_dir!r} (phase {run.get('phase')}) has {depth} block(s) in module {k}, "
                        f"this config needs {expect['depth']}: pass {kind}")
  path, name = module_dir(run_dir, k), module_name(k)
  if not path.is_dir():
    raise ModassemError(f"{what} {run_dir!r} has no trained {name}: it has not finished; "
                        f"rerun its command to finish it")
  why = damage.digest_damage(path)
  if not damage.all_processes_agree(why is None):
    raise ModassemError(f"{what} {run_dir!r}: {name} is damaged ({why or 'found on process 0'}): rerun the run "
                        f"that made it (its command exports the module again from its final checkpoint)")
  ckptr = ocp.StandardCheckpointer()
  try:
    saved = _saved_shapes(ckptr, path)
  except Exception as e:  # Orbax raises many types for a broken item.
    raise ModassemError(f"{what} {run_dir!r}: {name} is unreadable ({type(e).__name__}): "
                        f"rerun the run that made it") from None
  # Shapes first, from metadata: a mismatch is named by parameter, before any array is read.
  check_shapes(saved, abstract, f"{what} {run_dir!r} {name}")
  # Arrays land where the caller places them; with no placement given, on this
  # process's first device (whatever topology wrote them).
  abstract = _on_this_host(abstract)
  try:
    return ckptr.restore(path, abstract)
  except Exception as e:
    raise ModassemError(f"{what} {run_dir!r}: {name} could not be read ({type(e).__name__}): "
                        f"rerun the run that made it") from None


def check_shapes(tree, abstract, where: str) -> None:
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
  if len(got) != len(want):
    raise ModassemError(f"{where} has {len(got)} arrays, this config expects {len(want)}: use a run of the same preset")
  for path, x in got:
    w = want.get(path)
    if w is None or tuple(x.shape) != tuple(w.shape):
      name = jax.tree_util.keystr(path)
      raise ModassemError(f"{where}{name} has shape {tuple(x.shape)}, this config expects "
                          f"{None if w is None else tuple(w.shape)}: use a run of the same preset")
