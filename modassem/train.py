"""The one trainer: every phase is `train(config, workdir)` with a different plan.

`prepare` checks everything and reads the runs this one builds on before
anything is written; then one donated step, lowered against the mesh's
shardings and compiled ahead of time, runs in a loop that logs, evaluates,
checkpoints and stops on a non-finite loss.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from modassem import checkpoints, cost, damage, files, full_disk, lock, preempt, prepare, records, sharding, summary
from modassem.distributed import is_main, say
from modassem.errors import ModassemError
from modassem.metrics import Progress, Writer
from modassem.names import metric_name, module_name
from modassem.prepare import Setup, place_batch


def _device_batches(it, shard, depth: int = 2):
  """Keeps `depth` batches in flight to the devices while the step runs."""
  queue = collections.deque()
  for batch in it:
    queue.append(place_batch(batch, shard))
    if len(queue) >= depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate(s: Setup, params) -> dict:
  """Loss, top-1 and top-5 (in %) on the held-out split, per group and overall (mean over groups)."""
  config, plan = s.config, s.plan
  batch_sh = sharding.batch_sharding(s.mesh)
  sums = None
  for batch in s.dataset.eval_batches(config.eval_batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    out = jax.device_get(s.eval_fn(params, s.frozen, place_batch(batch, batch_sh)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
  count = float(sums.pop("count"))
  res = {k: float(v) / count * (100.0 if not k.endswith("loss") else 1.0) for k, v in sums.items()}
  groups = list(plan.groups)
  for metric in ("loss", "top1", "top5"):
    res[metric] = sum(res[metric_name(g, metric)] for g in groups) / len(groups)
  if not plan.incubate:
    res = {k: v for k, v in res.items() if "/" not in k}
  return res


def train(config, workdir: str, *, allow_changed=()) -> dict:
  """Trains (or resumes, or reports a finished) run of `config.phase` in `workdir`.

  A resume must use the config the run was started with (`config.json`),
  except for fields that only change reporting (`records.FREE_FIELDS`)
  and the fields named in `allow_changed`. One run writes a directory at a
  time (`lock.py`): a second one stops with an error naming the first.
  SIGTERM or SIGINT stops it after saving a checkpoint (`preempt.py`), with
  `preempt.Preempted`.
  """
  s = prepare.setup(config, workdir)
  changed = records.check_config(workdir, s.config, tuple(allow_changed))
  with (full_disk.one_line(workdir, lambda: prepare.state_spec(s).abstract), lock.writer(workdir, say=say),
        preempt.handling() as stop):
    return _train(s, workdir, changed, stop)


def _train(s: Setup, workdir: str, changed: list[str], stop: preempt.Stop) -> dict:
  """`train` once the run's checks have passed and its directory is locked."""
  config = s.config
  wd = files.path(workdir)
  done = files.read_json(wd / records.RESULTS_FILE)
  finished = done is not None and done.get("steps") == s.total_steps
  damaged = [k for k in s.plan.trained if not checkpoints.module_intact(workdir, k)] if finished else []
  finished, damaged = _agreed(finished, damaged, s.plan.num_modules)
  if finished:
    done = done or files.read_json(wd / records.RESULTS_FILE)
    if damaged:
      _export_again(s, workdir, damaged)
    else:
      say(f"{workdir}: {s.plan.phase} run already finished at step {s.total_steps} "
          f"(top-1 {done.get('top1', float('nan')):.2f} %); nothing to do")
    return done

  say(f"{workdir}: {s.plan.phase}: tracing the train step")
  step = prepare.lower_train_step(s)
  step_flops = cost.train_step_flops(s, step)
  lowered, _, init_fn, abstract_state, key, schedule = step
  del step   # its init_fn holds an assembly's loaded modules, released below once the state is initialised
  info = summary.startup(s, abstract_state.params, step_flops)
  for line in summary.startup_lines(s.plan.phase, info):
    say(line)
  say(f"{s.plan.phase}: compiling...")
  t_compile = time.perf_counter()
  compiled = lowered.compile()
  info["compile_s"] = time.perf_counter() - t_compile
  say(f"{s.plan.phase}: compiled in {info['compile_s']:.1f} s")
  wd.mkdir(parents=True, exist_ok=True)
  if is_main():
    files.write_json(wd / records.RUN_FILE, s.run)
    files.write_json(wd / records.CONFIG_FILE, records.config_record(config))
  if changed:
    say(f"{workdir}: continuing with changed {', '.join(changed)} (now in {records.CONFIG_FILE})")
  mngr = checkpoints.manager(workdir, config)
  writer = Writer(workdir, process_index=jax.process_index())
  state, latest = checkpoints.restore_newest_intact(workdir, mngr, abstract_state, say=say)
  if latest is not None:
    say(f"{workdir}: resuming {s.plan.phase} from step {latest}/{s.total_steps}")
  else:
    if s.sources is not None and not prepare.sources_are_read(s):
      # A resume of an assembly whose checkpoints were all damaged: it starts over from its incubation runs.
      s.sources = prepare.read_sources(s.config, s.plan, s.mesh, s.model_of)
      init_fn = prepare.state_spec(s).init_fn
    state = init_fn(key)
  # Assembly's loaded modules are in the state now: the step holds no second copy of them.
  s.sources, init_fn = None, None
  start = int(latest or 0)
  wall_before = writer.resume(start)
  if writer.set_aside:
    say(f"{workdir}: {writer.set_aside} line(s) of {writer.path.name} could not be read (cut short or damaged): "
        f"kept aside in {writer.aside}")
  writer.write(start, "setup", {k: v for k, v in info.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
  if start == 0 and s.plan.phase == "assemble":
    # How well the stacked modules work before any fine-tuning: the direct
    # measure of how compatible incubation made them.
    before = evaluate(s, state.params)
    writer.write(0, "eval", {**before, "wall_s": 0.0})
    say(f"{s.plan.phase}: the stacked modules before fine-tuning: top-1 {before['top1']:.2f} %, "
        f"top-5 {before['top5']:.2f} %, loss {before['loss']:.4f}")
  try:
    progress = Progress(s.total_steps, start, config.batch_size, config.progress if is_main() else "off",
                        label=s.plan.phase, quiet=not is_main(), step_flops=info["step_flops"],
                        peak_flops=info["peak_flops"], num_devices=info["devices"])
    loop = _Loop(s=s, compiled=compiled, key=key, schedule=schedule, mngr=mngr, writer=writer, progress=progress,
                 stop=stop, wall_before=wall_before)
    state = loop.run(state, start)
    loop_wall = time.perf_counter() - loop.t0
    mngr.wait_until_finished()
    result = evaluate(s, state.params)
    # The loop checks each step's loss, which is computed before that step's update: the last update is only
    # seen here, before anything is exported.
    finite = bool(_all_finite(state.params))
    if not (finite and math.isfinite(result["loss"])):
      _stop_diverged(mngr, s.total_steps, f"the last step ({s.total_steps}) diverged: its parameters are "
                     f"{'finite' if finite else 'not finite'}, their held-out loss is {result['loss']}")
    checkpoints.save_modules(workdir, prepare.saved_layout(config, state.params))
    wall = wall_before + loop_wall
    result.update(phase=s.plan.phase, steps=s.total_steps, wall_s=wall, train_flops=step_flops * s.total_steps,
                  step_flops=step_flops, trained=list(s.plan.trained), preset=config.preset)
    writer.write(s.total_steps, "final", {k: v for k, v in result.items() if isinstance(v, float)})
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  # results.json last: its presence marks the run finished.
  if is_main():
    files.write_json(wd / records.RESULTS_FILE, result)
  say(f"{workdir}: {s.plan.phase} done in {wall:.0f} s: top-1 {result['top1']:.2f} %, "
       f"top-5 {result['top5']:.2f} %, loss {result['loss']:.4f}")
  return result


def _agreed(finished: bool, damaged: list[int], num_modules: int) -> tuple[bool, list[int]]:
  """Process 0's view of a finished run's state, for every process: each one reads the shared run directory, and a
  filesystem may show them different states for a while (NFS attribute caches, object listings); since training and
  exporting again are collective, every process must take the same branch."""
  if jax.process_count() == 1:
    return finished, damaged
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  view = np.zeros(num_modules + 1, np.int32)
  view[0] = finished
  view[[1 + k for k in damaged]] = 1
  view = np.asarray(multihost_utils.broadcast_one_to_all(view))
  return bool(view[0]), [k for k in range(num_modules) if view[1 + k]]


def _export_again(s: Setup, workdir: str, damaged: list[int]) -> None:
  """A finished run whose modules are missing or damaged: exports them again from its final checkpoint (the
  damaged items are moved aside, not deleted)."""
  names = ", ".join(module_name(k) for k in damaged)
  mngr = checkpoints.manager(workdir, s.config) if checkpoints.state_dir(workdir).is_dir() else None
  try:
    if mngr is None or checkpoints.newest_sound_step(workdir, mngr, say=say) != s.total_steps:
      raise ModassemError(f"{workdir}: the {s.plan.phase} run finished, but {names} in modules/ are missing or "
                          f"damaged and its final checkpoint (step {s.total_steps}) is gone or damaged too: rerun "
                          f"the phase in a new --workdir")
    state = checkpoints.restore_state(mngr, s.total_steps, prepare.state_spec(s).abstract)
  finally:
    if mngr is not None:
      mngr.close()
  moved = damage.move_aside_together(workdir, [checkpoints.module_dir(workdir, k) for k in damaged
                                               if checkpoints.module_dir(workdir, k).exists()])
  params = prepare.saved_layout(s.config, state.params)
  checkpoints.save_modules(workdir, {module_name(k): params[module_name(k)] for k in damaged})
  where = f" (the damaged items are in {moved[0].parent})" if moved else ""
  say(f"{workdir}: the {s.plan.phase} run finished at step {s.total_steps}, but {names} in modules/ were missing or "
      f"damaged: exported them again from its final checkpoint{where}")


@jax.jit
def _all_finite(tree):
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _stop_diverged(mngr, first_bad: int, what: str):
  """Stops a diverged run: the checkpoints from step `first_bad` on are deleted, so that a rerun resumes from the
  last good one (or starts over); the one named is one whose files match their digests."""
  mngr.wait_for_digests()   # no digest pass still writing into a step deleted here
  for bad in [c for c in mngr.all_steps() if c >= first_bad]:
    mngr.delete(bad)
  where = mngr.directory
  good = checkpoints.newest_sound_step(files.path(where).parent, mngr, say=say)
  kept = (f"the last good checkpoint is step {good} in {where}, where a rerun resumes"
          if good is not None else "no good checkpoint was saved yet, so a rerun starts over")
  raise ModassemError(f"{what}: training stopped; {kept}; lower --config.optim.lr or check the data")


@dataclasses.dataclass(kw_only=True)
class _Loop:
  """The steps of a run from `start` on. Each step runs the compiled update, then the named steps around it, in
  MaxText's manner: `record_metrics`, `maybe_evaluate`, `maybe_save_checkpoint`, `maybe_stop`.

  A step's loss is read one step late (`pending`), so that the host never waits on the device between steps; the
  steps that act on the state (a checkpoint, a stop) check it first.
  """
  s: Setup
  compiled: Any
  key: Any
  schedule: dict   # the learning rate schedule's numbers (`optim.schedule_values`), an argument of the step
  mngr: Any
  writer: Writer
  progress: Progress
  stop: preempt.Stop
  wall_before: float
  t0: float = dataclasses.field(default_factory=time.perf_counter)
  pending: tuple | None = None   # (step, metrics) of the newest step, not yet checked

  @functools.cached_property
  def eval_every(self) -> int:
    return self.s.config.eval_every_steps or self.s.dataset.steps_per_epoch(self.s.config.batch_size)

  def wall(self) -> float:
    return self.wall_before + time.perf_counter() - self.t0

  def check(self) -> float:
    """The pending step's loss; a non-finite one stops the run (`_stop_diverged`)."""
    step, metrics = self.pending
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      # The loss of step s comes from the state saved as step s - 1: that
      # checkpoint holds the diverged parameters, and a resume must not start from it.
      _stop_diverged(self.mngr, step - 1, f"loss is {loss} at step {step}")
    return loss

  def run(self, state, start: int):
    s, config = self.s, self.s.config
    batches = _device_batches(s.dataset.train_batches(
        config.batch_size, seed=config.seed, start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count()), sharding.batch_sharding(s.mesh))
    try:
      for step in range(start + 1, s.total_steps + 1):
        state, metrics = self.compiled(state, s.frozen, next(batches), self.key, self.schedule)
        if self.pending is not None:
          self.check()
        self.pending = (step, metrics)
        self.record_metrics(step)
        self.progress.update(step)
        self.maybe_evaluate(step, state)
        self.maybe_save_checkpoint(step, state)
        self.maybe_stop(step, state)
    finally:
      self.progress.close()
    return state

  def record_metrics(self, step: int) -> None:
    """Every `log_every_steps` and at the last step: the step's metrics to metrics.jsonl, TensorBoard and the
    progress line."""
    if step % self.s.config.log_every_steps and step != self.s.total_steps:
      return
    loss = self.check()
    # The step has finished (its loss is on the host): its mark, taken now, makes the speed count the step's own
    # time. Taken at dispatch, right after an evaluation the window would hold only the asynchronous dispatch of
    # a step or two, and the speed would read hundreds of times too high.
    self.progress.update(step)
    values = {k: float(v) for k, v in jax.device_get(self.pending[1]).items()}
    values["wall_s"] = self.wall()
    values.update(self.progress.rates())
    self.writer.write(step, "train", values)
    self.progress.log(step, loss=loss, lr=values["lr"])
    self.progress.show(loss=loss)

  def maybe_evaluate(self, step: int, state) -> None:
    """Every `eval_every_steps` (once per epoch where 0) but the last step, which `_train` evaluates."""
    s = self.s
    if step % self.eval_every or step == s.total_steps:
      return
    ev = evaluate(s, state.params)
    self.writer.write(step, "eval", {**ev, "wall_s": self.wall()})
    self.progress.evaluation(step, ev)
    self.progress.paused()

  def maybe_save_checkpoint(self, step: int, state) -> None:
    """Every `checkpoint_every_steps` and at the last step, of a state whose loss was finite."""
    if step % self.s.config.checkpoint_every_steps and step != self.s.total_steps:
      return
    self.check()
    checkpoints.save_state(self.mngr, step, state, force=step == self.s.total_steps)
    self.writer.flush()   # the records up to a checkpoint are kept wherever a resume starts
    self.progress.paused()

  def maybe_stop(self, step: int, state) -> None:
    """After SIGTERM or SIGINT (`preempt.py`): saves this step, unless it was just saved, and stops."""
    if step == self.s.total_steps or not self.stop.requested(step):
      return
    self.check()
    self.mngr.wait_until_finished()   # a save in flight completes first: never two at once, never half of one
    if self.mngr.latest_step() != step:
      checkpoints.save_state(self.mngr, step, state, force=True)
      self.mngr.wait_until_finished()
    raise preempt.Preempted(self.stop.signame, step, self.s.total_steps,
                            str(checkpoints.state_dir(self.writer.path.parent)))


def evaluate_run(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint of the run in `workdir` (made with `config`)."""
  wd = files.path(workdir)
  if not (wd / records.RUN_FILE).exists():
    raise ModassemError(f"{workdir} is not a run directory (no {records.RUN_FILE}): pass the --workdir of a run")
  s = prepare.setup(config, workdir, load_sources=False)
  # A converted run has no checkpoints/ folder, and evaluating it must not make one.
  mngr = checkpoints.manager(workdir, config) if checkpoints.state_dir(workdir).is_dir() else None
  try:
    state, latest = (checkpoints.restore_newest_intact(workdir, mngr, prepare.state_spec(s).abstract, say=say)
                     if mngr is not None else (None, None))
    if latest is not None:
      params = state.params
    elif all(checkpoints.module_dir(workdir, k).is_dir() for k in s.plan.trained):
      # No train state, but every trained module: a run imported with `modassem convert`
      # (an official checkpoint has no Orbax train state to restore).
      params = prepare.load_modules(config, s.plan, s.mesh, s.model_of, s.plan.trained, s.plan.depths,
                                    [workdir] * len(s.plan.trained), "run")
      latest = (files.read_json(wd / records.RUN_FILE) or {}).get("total_steps", 0)
    else:
      raise ModassemError(f"{workdir} has no checkpoint yet: train the run first")
  finally:
    if mngr is not None:
      mngr.close()
  result = evaluate(s, params)
  result.update(phase=s.plan.phase, step=int(latest), workdir=workdir)
  if is_main():
    files.write_json(wd / "eval.json", result)
  return result
