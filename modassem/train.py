"""The one trainer: every phase is `train(config, workdir)` with a different plan.

Set-up reads and checks everything (config, data, the runs this one builds
on) before it writes anything, so bad input leaves no trace in `workdir`.
Then: shardings from `jax.eval_shape`, a jitted init (or an Orbax restore)
straight into those shardings, one AOT-compiled donated step, and a loop that
logs, evaluates, checkpoints and stops on a non-finite loss.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from modassem import checkpoints, data as data_lib, phases, sharding, steps
from modassem.distributed import is_main, say
from modassem.errors import ModassemError
from modassem.metrics import Progress, Writer
from modassem.models.vit import REMAT_POLICIES, stack_blocks, unstack_blocks
from modassem.optim import lr_schedule, make_optimizer
from modassem.phases import Plan, module_name

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and checked before anything is written."""
  config: Any
  plan: Plan
  dataset: Any
  mesh: Any
  model_of: Any
  run: dict
  total_steps: int
  warmup_steps: int
  frozen: dict            # frozen meta modules (incubation), placed on the mesh
  sources: dict | None    # assembled modules (assembly), placed on the mesh

  @functools.cached_property
  def eval_fn(self):
    # Built once per run: a fresh jit per evaluation would retrace every time.
    return jax.jit(functools.partial(steps.eval_step, plan=self.plan, model_of=self.model_of))


def check_config(config, plan: Plan, num_devices: int, *, load_sources: bool = True) -> None:
  m = config.model
  if m.image_size % m.patch:
    raise ModassemError(f"model.image_size={m.image_size} is not divisible by model.patch={m.patch}: "
                        f"use an image size that is a multiple of {m.patch}")
  if m.width % m.heads:
    raise ModassemError(f"model.width={m.width} is not divisible by model.heads={m.heads}")
  if m.get("attention", "auto") not in ("auto", "xla", "cudnn"):
    raise ModassemError(f"model.attention={m.attention!r} is unknown: use auto, xla or cudnn")
  if not isinstance(m.get("scan", False), bool):
    raise ModassemError(f"model.scan={m.scan!r} is not a boolean: use True or False")
  if m.get("remat", "none") not in REMAT_POLICIES:
    raise ModassemError(f"model.remat={m.remat!r} is unknown: use one of {', '.join(REMAT_POLICIES)}")
  if str(m.dtype) not in _DTYPES:
    raise ModassemError(f"model.dtype={m.dtype!r} is unknown: use one of {', '.join(_DTYPES)}")
  per = num_devices * config.accum_steps
  if config.batch_size % per:
    raise ModassemError(f"batch_size={config.batch_size} is not divisible by devices x accum_steps = "
                        f"{num_devices} x {config.accum_steps}: use a multiple of {per}")
  if config.eval_batch_size % num_devices:
    raise ModassemError(f"eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices")
  if plan.phase == "incubate" and not config.meta:
    raise ModassemError("incubation needs the meta run: pass --config.meta=WORKDIR_OF_THE_META_RUN")
  if plan.phase == "assemble" and load_sources:
    listed = [s for s in str(config.modules).split(",") if s]
    if len(listed) != plan.num_modules:
      raise ModassemError(f"config.modules lists {len(listed)} run(s), the model has {plan.num_modules} modules: "
                          f"pass one incubation run per module, comma-separated, in module order")


def module_sources(config, plan: Plan) -> list[str]:
  if plan.phase == "assemble":
    return [s.strip() for s in str(config.modules).split(",")]
  if plan.phase == "incubate":
    return [str(config.meta)]
  return []


def run_info(config, plan: Plan, total_steps: int) -> dict:
  return {"phase": plan.phase, "preset": config.preset, "arch": checkpoints.arch_of(config),
          "depths": list(plan.depths), "trained": list(plan.trained), "total_steps": total_steps,
          "sources": module_sources(config, plan), "scan": phases.scans(config)}


def abstract_modules(model) -> dict:
  image = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), image))["params"]


def _with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def placed(tree, mesh, config):
  """`tree`'s shapes with the shardings `config.sharding` gives them on `mesh`."""
  return _with_shardings(tree, sharding.tree_shardings(tree, mesh, config.sharding))


def _load_modules(config, plan: Plan, mesh, model_of, slots, depths, run_dirs, what) -> dict:
  """Modules `slots` from `run_dirs` (one per slot), checked and placed on the mesh.

  Saved modules are in the per-block layout; a scanned model gets them stacked.
  """
  abstract = abstract_modules(model_of(depths, scan=False))
  out = {}
  for k, run_dir in zip(slots, run_dirs):
    expect = {"arch": checkpoints.arch_of(config), "preset": config.preset, "num_modules": plan.num_modules,
              "depth": depths[k]}
    out[module_name(k)] = checkpoints.load_module(run_dir, k, expect=expect, what=what,
                                                  abstract=placed(abstract[module_name(k)], mesh, config))
  if phases.scans(config):
    target = sharding.tree_shardings(jax.eval_shape(stack_blocks, out), mesh, config.sharding)
    out = jax.jit(stack_blocks, out_shardings=target)(out)
  return out


def saved_layout(config, params) -> dict:
  """`params` in the per-block layout that module checkpoints and conversion use."""
  # Jitted, so that on several hosts every process slices its own shards of the global arrays.
  return jax.jit(unstack_blocks)(params) if phases.scans(config) else params


def schedule_lengths(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total, warmup) steps: `total_steps`/`warmup_steps` where set, else the epochs times `steps_per_epoch`."""
  total = config.total_steps if config.total_steps > 0 else int(round(config.epochs * steps_per_epoch))
  warmup = config.warmup_steps if config.warmup_steps >= 0 else int(round(config.warmup_epochs * steps_per_epoch))
  total = max(int(total), 1)
  return total, min(int(warmup), total)


def setup(config, workdir: str | None, *, load_sources: bool = True) -> Setup:
  """Checks `config` and reads what the run builds on; `load_sources=False` skips assembly's module
  sources (evaluating a run restores its own parameters)."""
  plan = phases.make_plan(config)
  mesh = sharding.make_mesh()
  check_config(config, plan, mesh.size, load_sources=load_sources)
  sharding.check_mode(config.sharding)
  dataset = data_lib.build(config.data, config.model.image_size)
  if dataset.num_classes != config.model.num_classes:
    raise ModassemError(f"the dataset has {dataset.num_classes} classes, model.num_classes={config.model.num_classes}: "
                        f"set --config.model.num_classes={dataset.num_classes}")
  total, warmup = schedule_lengths(config, dataset.steps_per_epoch(config.batch_size))
  model_of = functools.partial(phases.model_for, config)
  run = run_info(config, plan, total)
  if workdir is not None:
    checkpoints.check_workdir(workdir, run)

  frozen, sources = {}, None
  if plan.phase == "incubate":
    needed = phases.frozen_slots(plan)
    frozen = _load_modules(config, plan, mesh, model_of, needed, plan.meta_depths, [config.meta] * len(needed),
                           "meta run")
  elif plan.phase == "assemble" and load_sources:
    dirs = module_sources(config, plan)
    sources = _load_modules(config, plan, mesh, model_of, range(plan.num_modules), plan.depths, dirs,
                            "module source")
  return Setup(config, plan, dataset, mesh, model_of, run, total, warmup, frozen, sources)


def _place_batch(batch: dict, shard) -> dict:
  return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}


def _device_batches(it, shard, depth: int = 2):
  """Keeps `depth` batches in flight to the devices while the step runs."""
  queue = collections.deque()
  for batch in it:
    queue.append(_place_batch(batch, shard))
    if len(queue) >= depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def flops_of(compiled, num_devices: int = 1) -> float:
  """FLOPs of one call, summed over devices.

  XLA's cost analysis of a partitioned program counts one device's share, so
  the total is that times the device count (replicated work, such as the
  optimizer update under data parallelism, is counted on every device: it is
  executed on every device).
  """
  return _flops(compiled.cost_analysis()) * num_devices


def _flops(cost) -> float:
  # Older JAX versions return one dict per program, newer ones the dict.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def state_spec(s: Setup):
  """The optimizer, its schedule, the state's init and its abstract value carrying shardings."""
  config, plan, mesh = s.config, s.plan, s.mesh
  tx = make_optimizer(config, s.total_steps, s.warmup_steps)
  schedule = lr_schedule(config, s.total_steps, s.warmup_steps)
  if s.sources is not None:
    init = lambda k: steps.init_state(plan, tx, s.sources)
  else:
    init = lambda k: steps.init_state(plan, tx, phases.init_trained(plan, s.model_of(plan.depths), k))
  key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, key)
  state_sh = sharding.tree_shardings(abstract, mesh, config.sharding)
  return tx, schedule, jax.jit(init, out_shardings=state_sh), _with_shardings(abstract, state_sh)


def lower_train_step(s: Setup):
  """The jitted, donated train step lowered for the mesh, with the state's init and abstract value."""
  config, plan, mesh = s.config, s.plan, s.mesh
  tx, schedule, init_fn, abstract = state_spec(s)
  state_sh = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, s.frozen)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step_fn = functools.partial(steps.train_step, config=config, plan=plan, model_of=s.model_of, tx=tx,
                              schedule=schedule)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                   out_shardings=(state_sh, repl), donate_argnums=0)
  size = config.model.image_size
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh)}
  key = jax.random.key(config.seed)
  return jitted.lower(abstract, s.frozen, batch, key), init_fn, abstract, key


def compile_train_step(s: Setup):
  """The jitted, donated, AOT-compiled train step, with the state's init and abstract value."""
  lowered, init_fn, abstract, key = lower_train_step(s)
  return lowered.compile(), init_fn, abstract, key


def unrolled(s: Setup) -> Setup | None:
  """`s` with its step's loops written out (no scan over blocks, no accumulation scan), or None if it has none.

  XLA's cost analysis counts a loop's body once whatever its trip count, so a
  step with loops is counted on this equivalent loop-free step: the same
  work, since accumulation only splits the batch. Sources are left out (a
  fresh init compiles to the same step) and frozen modules become shapes.
  """
  c = s.config
  if not phases.scans(c) and c.accum_steps == 1:
    return None
  c = copy.deepcopy(c)
  with c.unlocked():
    c.model.scan = False
    c.accum_steps = 1
  frozen = {name: placed(tree, s.mesh, c) for name, tree in jax.eval_shape(unstack_blocks, s.frozen).items()}
  return dataclasses.replace(s, config=c, model_of=functools.partial(phases.model_for, c), frozen=frozen,
                             sources=None)


def train_step_flops(s: Setup, compiled=None) -> float:
  """FLOPs of one train step of `s`, summed over devices, from XLA's cost analysis.

  A loop-free step is read from its compiled program (`compiled`, compiled
  here when not given). A step with loops is read from its `unrolled` twin,
  lowered but not compiled: compiling it would cost the time the scan saves.
  The lowered program is counted before XLA's optimisations; on the presets
  that reads within 1 % of the compiled count of the same step.
  """
  twin = unrolled(s)
  if twin is None:
    return flops_of(compiled if compiled is not None else compile_train_step(s)[0], s.mesh.size)
  # Lowered, the program is still the global one: its count is already the total over devices.
  return _flops(lower_train_step(twin)[0].cost_analysis())


def step_flops(config) -> float:
  """FLOPs of one train step of `config`, from XLA's cost analysis; writes nothing."""
  return train_step_flops(setup(config, None))


def evaluate(s: Setup, params) -> dict:
  """Loss, top-1 and top-5 (in %) on the held-out split, per group and overall (mean over groups)."""
  config, plan = s.config, s.plan
  batch_sh = sharding.batch_sharding(s.mesh)
  sums = None
  for batch in s.dataset.eval_batches(config.eval_batch_size, process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    out = jax.device_get(s.eval_fn(params, s.frozen, _place_batch(batch, batch_sh)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
  count = float(sums.pop("count"))
  res = {k: float(v) / count * (100.0 if not k.endswith("loss") else 1.0) for k, v in sums.items()}
  groups = list(plan.groups)
  for metric in ("loss", "top1", "top5"):
    res[metric] = sum(res[f"{g}/{metric}"] for g in groups) / len(groups)
  if not plan.incubate:
    res = {k: v for k, v in res.items() if "/" not in k}
  return res


def train(config, workdir: str) -> dict:
  """Trains (or resumes, or reports a finished) run of `config.phase` in `workdir`."""
  s = setup(config, workdir)
  done = checkpoints.read_json(os.path.join(workdir, checkpoints.RESULTS_FILE))
  if done is not None and done.get("steps") == s.total_steps:
    say(f"{workdir}: {s.plan.phase} run already finished at step {s.total_steps} "
        f"(top-1 {done.get('top1', float('nan')):.2f} %); nothing to do")
    return done

  compiled, init_fn, abstract_state, key = compile_train_step(s)
  step_flops = train_step_flops(s, compiled)
  os.makedirs(workdir, exist_ok=True)
  if is_main():
    checkpoints.write_json(os.path.join(workdir, checkpoints.RUN_FILE), s.run)
  mngr = checkpoints.manager(workdir, config)
  writer = Writer(workdir, process_index=jax.process_index())
  latest = mngr.latest_step()
  if latest is not None:
    state = checkpoints.restore_state(mngr, latest, abstract_state)
    say(f"{workdir}: resuming {s.plan.phase} from step {latest}/{s.total_steps}")
  else:
    state = init_fn(key)
  start = int(latest or 0)
  wall_before = writer.resume(start)
  if start == 0 and s.plan.phase == "assemble":
    # How well the stacked modules work before any fine-tuning: the direct
    # measure of how compatible incubation made them.
    writer.write(0, "eval", {**evaluate(s, state.params), "wall_s": 0.0})
  try:
    state, loop_wall = _loop(s, compiled, state, start, key, mngr, writer, wall_before)
    mngr.wait_until_finished()
    checkpoints.save_modules(workdir, saved_layout(config, state.params))
    result = evaluate(s, state.params)
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
    checkpoints.write_json(os.path.join(workdir, checkpoints.RESULTS_FILE), result)
  say(f"{workdir}: {s.plan.phase} done in {wall:.0f} s: top-1 {result['top1']:.2f} %, "
       f"top-5 {result['top5']:.2f} %, loss {result['loss']:.4f}")
  return result


def _loop(s: Setup, compiled, state, start, key, mngr, writer, wall_before):
  config = s.config
  eval_every = config.eval_every_steps or s.dataset.steps_per_epoch(config.batch_size)
  shard = sharding.batch_sharding(s.mesh)
  batches = _device_batches(s.dataset.train_batches(
      config.batch_size, seed=config.seed, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count()), shard)
  progress = Progress(s.total_steps, start, config.batch_size, config.progress if is_main() else "off",
                      label=s.plan.phase, quiet=not is_main())
  t0 = time.perf_counter()
  pending = None   # (step, metrics) of the previous step: read one step late to keep the device busy

  def check(step, metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      mngr.wait_until_finished()
      # The loss of step s comes from the state saved as step s - 1: that
      # checkpoint holds the diverged parameters, and a resume must not start from it.
      for bad in [c for c in mngr.all_steps() if c >= step - 1]:
        mngr.delete(bad)
      good = mngr.latest_step()
      ckpt_dir = checkpoints.state_dir(os.path.dirname(writer.path))
      kept = (f"the last good checkpoint is step {good} in {ckpt_dir}, where a rerun resumes"
              if good is not None else "no good checkpoint was saved yet, so a rerun starts over")
      raise ModassemError(f"loss is {loss} at step {step}: training stopped; {kept}; "
                          f"lower --config.optim.lr or check the data")
    return loss

  try:
    for step in range(start + 1, s.total_steps + 1):
      state, metrics = compiled(state, s.frozen, next(batches), key)
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      if step % config.log_every_steps == 0 or step == s.total_steps:
        loss = check(*pending)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["wall_s"] = wall_before + time.perf_counter() - t0
        values["img_per_s"] = progress.rate()
        writer.write(step, "train", values)
        progress.log(step, loss=loss, lr=values["lr"])
        progress.show(loss=loss)
      progress.update(step)
      if step % eval_every == 0 and step != s.total_steps:
        ev = evaluate(s, state.params)
        writer.write(step, "eval", {**ev, "wall_s": wall_before + time.perf_counter() - t0})
        progress.log(step, eval_top1=ev["top1"])
      if step % config.checkpoint_every_steps == 0 or step == s.total_steps:
        check(*pending)
        checkpoints.save_state(mngr, step, state, force=step == s.total_steps)
  finally:
    progress.close()
  return state, time.perf_counter() - t0


def evaluate_run(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint of the run in `workdir` (made with `config`)."""
  if not os.path.isfile(os.path.join(workdir, checkpoints.RUN_FILE)):
    raise ModassemError(f"{workdir} is not a run directory (no {checkpoints.RUN_FILE}): pass the --workdir of a run")
  s = setup(config, workdir, load_sources=False)
  # A converted run has no checkpoints/ folder, and evaluating it must not make one.
  mngr = checkpoints.manager(workdir, config) if os.path.isdir(checkpoints.state_dir(workdir)) else None
  try:
    latest = mngr.latest_step() if mngr is not None else None
    if latest is not None:
      params = checkpoints.restore_state(mngr, latest, state_spec(s)[3]).params
    elif all(os.path.isdir(checkpoints.module_dir(workdir, k)) for k in s.plan.trained):
      # No train state, but every trained module: a run imported with `modassem convert`
      # (an official checkpoint has no Orbax train state to restore).
      params = _load_modules(config, s.plan, s.mesh, s.model_of, s.plan.trained, s.plan.depths,
                             [workdir] * len(s.plan.trained), "run")
      latest = (checkpoints.read_json(os.path.join(workdir, checkpoints.RUN_FILE)) or {}).get("total_steps", 0)
    else:
      raise ModassemError(f"{workdir} has no checkpoint yet: train the run first")
  finally:
    if mngr is not None:
      mngr.close()
  result = evaluate(s, params)
  result.update(phase=s.plan.phase, step=int(latest), workdir=workdir)
  if is_main():
    checkpoints.write_json(os.path.join(workdir, "eval.json"), result)
  return result
