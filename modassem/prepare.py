"""A run before its first step: the config checked (`checks.py`), the runs it builds on read and placed on the
mesh, the sharded state's init, and the train step lowered against abstract values.

Set-up reads and checks everything (config, data, the runs this one builds on) before anything is written, so bad
input leaves no trace in a run directory. Shardings come from `jax.eval_shape`; the state is initialised (or
restored) straight into them; the step is jitted with its state donated.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from modassem import checkpoints, checks, data as data_lib, files, memo, phases, records, sharding, steps
from modassem.distributed import say
from modassem.errors import ModassemError
from modassem.models.vit import abstract_params, stack_blocks, unstack_blocks
from modassem.optim import lr_schedule, make_optimizer, schedule_values
from modassem.phases import Plan, module_name


@dataclasses.dataclass(kw_only=True)
class Setup:
  """Everything a run needs, built and checked before anything is written (`setup`), or its shapes alone
  (`abstract_setup`: no data, no modules)."""
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


def module_sources(config, plan: Plan) -> list[str]:
  if plan.phase == "assemble":
    return [s.strip() for s in str(config.modules).split(",")]
  if plan.phase == "incubate":
    return [str(config.meta)]
  return []


def run_info(config, plan: Plan, total_steps: int) -> dict:
  info = {"phase": plan.phase, "preset": config.preset, "arch": records.arch_of(config),
          "depths": list(plan.depths), "trained": list(plan.trained), "total_steps": total_steps,
          "sources": module_sources(config, plan), "scan": phases.scans(config)}
  if plan.teacher_depths is not None:
    info["teacher"] = {"run": str(config.teacher), "depths": list(plan.teacher_depths)}
  if plan.stitched:
    info["stitches"] = {"meta": dict(plan.meta_arch), "note": "stitch layers join each incubated module to the "
                        "meta model of another width; they are in this run's checkpoints, not in modules/, and "
                        "assembly does without them"}
  return info


# What a meta model may differ in from the target it incubates: stitch layers bridge the width.
STITCHED_FIELDS = ("width", "heads", "mlp_ratio")


def meta_arch(config):
  """With `config.stitch`, the meta run's (width, heads, mlp_ratio) where its width differs from this model's (an
  incubation with stitch layers), else None. Anything else that differs is an error when the meta modules load."""
  if not config.stitch:
    return None
  run = files.read_json(files.path(config.meta) / records.RUN_FILE) or {}
  arch = run.get("arch") or {}
  if "width" not in arch or arch["width"] == config.model.width:
    return None
  return tuple((f, arch[f]) for f in STITCHED_FIELDS if f in arch)


def plan_of(config) -> Plan:
  """The whole plan of `config`'s run, the one place it is made: `phases.make_plan`'s, with what an incubation takes
  from the runs it builds on: the meta run's architecture where stitch layers join it, and the teacher's cut."""
  return _completed(config, phases.make_plan(config))


def _completed(config, plan: Plan) -> Plan:
  if plan.phase != "incubate":
    return plan
  plan = dataclasses.replace(plan, meta_arch=meta_arch(config))
  if config.teacher:
    plan = dataclasses.replace(plan, teacher_depths=teacher_cut(config, plan))
  return plan


def teacher_cut(config, plan: Plan) -> tuple[int, ...]:
  """The module depths of `config.teacher`: its run's, or an official .pth's; a run directory not trained yet (a
  plan made before the teacher) has the target's own cut."""
  where = str(config.teacher)
  if where.endswith(".pth"):
    from modassem import convert  # pylint: disable=g-import-not-at-top  (torch, only for a .pth teacher)
    return check_teacher_cut(where, convert.pth_depths(where), plan)
  run = files.read_json(files.path(where) / records.RUN_FILE)
  return check_teacher_cut(where, (run or {}).get("depths") or plan.depths, plan)


def check_teacher_cut(where: str, depths, plan: Plan) -> tuple[int, ...]:
  depths = tuple(int(d) for d in depths)
  if len(depths) != plan.num_modules:
    raise ModassemError(f"teacher {where!r} is cut into {len(depths)} modules {list(depths)}, this model into "
                        f"{plan.num_modules} {list(plan.depths)}: pass a teacher with model.num_modules="
                        f"{plan.num_modules}")
  return depths


def load_teacher(config, plan: Plan, mesh, model_of) -> dict:
  """{teacher_k: module k placed on the mesh} for the trained slots, of `config.teacher` (cut as
  `plan.teacher_depths`): a finished run directory, or an official `.pth` imported on the fly with the checks of
  `modassem convert`."""
  where = str(config.teacher)
  meta = phases.frozen_arch(plan)   # the teacher's modules sit in the meta model as they are: its width, dense
  depths = plan.teacher_depths
  if not where.endswith(".pth"):
    if files.read_json(files.path(where) / records.RUN_FILE) is None:
      raise ModassemError(f"teacher {where!r} is not a run directory (no {records.RUN_FILE}): pass the --workdir "
                          f"of a finished assembly, e2e or imported run, or an official .pth")
    modules = load_modules(config, plan, mesh, model_of, plan.trained, depths, [where] * len(plan.trained), "teacher",
                           arch=meta)
  else:
    from modassem import convert  # pylint: disable=g-import-not-at-top  (torch, only for a .pth teacher)
    expected = records.arch_of(config, **meta)
    # Heads and eps leave no trace in the weights: the teacher's are this model's (its shapes are checked below).
    model = convert.model_from_pth(where, heads=expected["heads"], ln_eps=expected["ln_eps"])
    detail = records.arch_difference(model.arch, expected)
    if detail:
      raise ModassemError(f"teacher {where!r} has another architecture than this config ({detail}): pass a "
                          f"checkpoint of preset {config.preset}")
    abstract = abstract_params(model_of(depths, scan=False, **meta))
    modules = {}
    for k in plan.trained:
      target = placed(abstract[module_name(k)], mesh, config)
      checkpoints.check_shapes(model.modules[k], target, f"teacher {where!r} module {k}")
      modules[module_name(k)] = jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding),
                                                       model.modules[k], target)
    modules = _in_model_layout(config, mesh, modules)
  # The teacher's modules are frozen like the meta modules: inputs of the step, never differentiated.
  return {phases.teacher_name(k): modules[module_name(k)] for k in plan.trained}


def _with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def placed(tree, mesh, config):
  """`tree`'s shapes with the shardings `config.sharding` gives them on `mesh`."""
  return _with_shardings(tree, sharding.tree_shardings(tree, mesh, config.sharding))


def load_modules(config, plan: Plan, mesh, model_of, slots, depths, run_dirs, what, arch=None) -> dict:
  """Modules `slots` from `run_dirs` (one per slot), checked and placed on the mesh; `arch` overrides the width,
  heads or MLP ratio they must have (a meta model of another width than the target).

  Saved modules are in the per-block layout; a scanned model gets them stacked.
  """
  arch = dict(arch or {})
  abstract = abstract_params(model_of(depths, scan=False, **arch))
  out = {}
  for k, run_dir in zip(slots, run_dirs):
    expect = {"arch": records.arch_of(config, **arch), "preset": config.preset,
              "num_modules": plan.num_modules, "depth": depths[k]}
    out[module_name(k)] = checkpoints.load_module(run_dir, k, expect=expect, what=what,
                                                  abstract=placed(abstract[module_name(k)], mesh, config))
  return _in_model_layout(config, mesh, out)


def _in_model_layout(config, mesh, modules: dict) -> dict:
  """Per-block modules as the model holds them: stacked where it scans."""
  if not phases.scans(config):
    return modules
  target = sharding.tree_shardings(jax.eval_shape(stack_blocks, modules), mesh, config.sharding)
  return jax.jit(stack_blocks, out_shardings=target)(modules)


def saved_layout(config, params) -> dict:
  """The modules of `params` in the per-block layout that module checkpoints and conversion use (stitch layers are
  not modules: they stay in the run's checkpoints, and assembly does without them)."""
  params = {n: p for n, p in params.items() if n.startswith("module_")}
  # Jitted, so that on several hosts every process slices its own shards of the global arrays.
  return jax.jit(unstack_blocks)(params) if phases.scans(config) else params


def schedule_lengths(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total, warmup) steps: `total_steps`/`warmup_steps` where set, else the epochs times `steps_per_epoch`."""
  total = config.total_steps if config.total_steps > 0 else int(round(config.epochs * steps_per_epoch))
  warmup = config.warmup_steps if config.warmup_steps >= 0 else int(round(config.warmup_epochs * steps_per_epoch))
  total = max(int(total), 1)
  return total, min(int(warmup), total)


def with_absolute_paths(config):
  """A copy of `config` whose run paths (`records.PATH_FIELDS`) are absolute, as the run records them."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for f in records.PATH_FIELDS:
      if isinstance(config[f], str):
        config[f] = files.absolute(config[f])
  return config


def check_one_meta(config, dirs: list[str]) -> None:
  """The incubation runs an assembly stacks grew their modules in one meta model, the method's premise: sources of
  different meta runs are refused, naming both, unless `allow_mixed_meta` is set."""
  if config.allow_mixed_meta:
    return
  seen = []   # (incubation run, its meta run), one per meta run
  for d in dict.fromkeys(dirs):
    run = files.read_json(files.path(d) / records.RUN_FILE) or {}
    meta = (run.get("sources") or [""])[0] if run.get("phase") == "incubate" else ""
    if not meta:
      continue   # not an incubation run: loading its modules names what is wrong
    meta = files.recorded(meta, d)
    if not any(files.run_key(meta) == files.run_key(m) for _, m in seen):
      seen.append((d, meta))
  if len(seen) > 1:
    (a, ma), (b, mb) = seen[:2]
    raise ModassemError(f"the module sources grew in different meta runs: {a} in {ma}, {b} in {mb}: assemble modules "
                        "incubated in one meta run, or pass --config.allow_mixed_meta=True to stack them anyway")


def setup(config, workdir: str | None, *, load_sources: bool = True) -> Setup:
  """Checks `config` and reads what the run builds on; `load_sources=False` skips assembly's module
  sources (evaluating a run restores its own parameters). The Setup's config has absolute run paths."""
  checks.check_numbers(config)
  config = with_absolute_paths(config)
  if workdir is not None:
    records.check_not_a_file(workdir)
  mesh = sharding.make_mesh()
  plan = checked_plan(config, mesh, load_sources=load_sources)
  model_of = functools.partial(phases.model_for, config, devices=mesh.size)
  teacher = {}
  if plan.stitched:
    say(f"the meta run {config.meta} has width {dict(plan.meta_arch)['width']}, this model {config.model.width}: "
        f"each incubated module gets stitch layers at its entry and exit (assembly drops them)")
  if plan.teacher_depths is not None:
    teacher = load_teacher(config, plan, mesh, model_of)
  dataset = data_lib.build(config.data, config.model.image_size)
  if dataset.num_classes != config.model.num_classes:
    raise ModassemError(f"the dataset has {dataset.num_classes} classes, model.num_classes={config.model.num_classes}: "
                        f"set --config.model.num_classes={dataset.num_classes}")
  if jax.process_count() > 1 and not dataset.source.random_access:
    say(f"{dataset.name} is in TFRecord files, which are read in sequence: every process reads the whole train "
        "stream; prepared with `tfds build --file_format=array_record`, each process reads only its share")
  total, warmup = schedule_lengths(config, dataset.steps_per_epoch(config.batch_size))
  run = run_info(config, plan, total)
  if workdir is not None:
    records.check_workdir(workdir, run)

  frozen, sources = {}, None
  if plan.phase == "incubate":
    needed = phases.frozen_slots(plan)
    frozen = load_modules(config, plan, mesh, model_of, needed, plan.meta_depths, [config.meta] * len(needed),
                          "meta run", arch=phases.frozen_arch(plan))
    frozen.update(teacher)
  elif plan.phase == "assemble" and load_sources:
    if workdir is not None and checkpoints.saved_steps(workdir):
      # A resume starts from its own checkpoint: the incubation runs are not read (they may have moved), only
      # their shapes stand in for them; `assembly_sources` reads them if no checkpoint reads back whole.
      sources = abstract_sources(config, plan, mesh, model_of)
    else:
      check_one_meta(config, module_sources(config, plan))
      sources = read_sources(config, plan, mesh, model_of)
  return Setup(config=config, plan=plan, dataset=dataset, mesh=mesh, model_of=model_of, run=run, total_steps=total,
               warmup_steps=warmup, frozen=frozen, sources=sources)


def checked_plan(config, mesh, *, load_sources: bool = True) -> Plan:
  """`plan_of(config)`, once the config has passed every check that needs no data (before the runs it builds on
  are read: a bad value is named first)."""
  plan = phases.make_plan(config)
  checks.check_config(config, plan, mesh.size, load_sources=load_sources)
  sharding.check_mode(config.sharding)
  return _completed(config, plan)


def abstract_setup(config, total_steps: int, warmup_steps: int) -> Setup:
  """What `setup` builds, as shapes: the same checks and plan, the frozen modules (meta and teacher) as shapes with
  shardings, no data read and no module loaded. For pricing a step (`modassem plan`): it lowers to the step that
  `setup`'s does, sources or not (a fresh init lowers to the same assembly step)."""
  checks.check_numbers(config)
  config = with_absolute_paths(config)
  mesh = sharding.make_mesh()
  plan = checked_plan(config, mesh, load_sources=False)
  model_of = functools.partial(phases.model_for, config, devices=mesh.size)
  # In the model's layout (stacked blocks where it scans), at the meta model's width, as `setup` places them.
  arch = phases.frozen_arch(plan)
  meta = abstract_params(model_of(plan.meta_depths, **arch))
  frozen = {module_name(k): placed(meta[module_name(k)], mesh, config) for k in phases.frozen_slots(plan)}
  if plan.teacher_depths is not None:
    teacher = abstract_params(model_of(plan.teacher_depths, **arch))
    frozen.update({phases.teacher_name(k): placed(teacher[module_name(k)], mesh, config) for k in plan.trained})
  return Setup(config=config, plan=plan, dataset=None, mesh=mesh, model_of=model_of, run={},
               total_steps=total_steps, warmup_steps=warmup_steps, frozen=frozen, sources=None)


def read_sources(config, plan: Plan, mesh, model_of) -> dict:
  """Assembly's modules, one from each incubation run of `config.modules`, checked and placed on the mesh."""
  return load_modules(config, plan, mesh, model_of, range(plan.num_modules), plan.depths,
                      module_sources(config, plan), "module source")


def abstract_sources(config, plan: Plan, mesh, model_of) -> dict:
  """The shapes and shardings of what `read_sources` returns, without reading anything."""
  abstract = abstract_params(model_of(plan.depths, scan=False))
  modules = {module_name(k): placed(abstract[module_name(k)], mesh, config) for k in range(plan.num_modules)}
  return placed(jax.eval_shape(stack_blocks, modules), mesh, config) if phases.scans(config) else modules


def sources_are_read(s: Setup) -> bool:
  return s.sources is not None and not any(isinstance(x, jax.ShapeDtypeStruct)
                                           for x in jax.tree_util.tree_leaves(s.sources))


def place_batch(batch: dict, shard) -> dict:
  return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}


def _init(s: Setup, tx):
  """The train state's init and the arguments it takes before the key.

  Assembly starts from the loaded modules. They are an argument of the compiled init, not constants it closes
  over: closed over, every parameter would be written into the program text (ViT-H's would pass protobuf's 2 GB
  limit), and with several processes JAX refuses to close over arrays that span other processes' devices.
  """
  plan = s.plan
  if s.sources is not None:
    return (lambda sources, k: steps.init_state(plan, tx, sources)), (s.sources,)
  return (lambda k: steps.init_state(plan, tx, phases.init_trained(plan, s.model_of(plan.depths), k))), ()


class StateSpec(NamedTuple):
  """A run's state init (`init_fn(key)`) and its abstract value with shardings."""
  init_fn: Any
  abstract: Any


class TrainStep(NamedTuple):
  """The train step, lowered (or compiled) for the mesh, its jaxpr, the state's init, its abstract value, the key,
  and the schedule's numbers: the step is called as `step(state, frozen, batch, key, schedule)`."""
  step: Any
  jaxpr: Any
  init_fn: Any
  abstract: Any
  key: Any
  schedule: Any


def state_spec(s: Setup) -> StateSpec:
  """The state's init and its abstract value carrying shardings."""
  config, mesh = s.config, s.mesh
  # The optimizer's state does not depend on its schedule; the step builds its own on the traced schedule values.
  tx = make_optimizer(config, lr_schedule(config, s.total_steps, s.warmup_steps))
  init, args = _init(s, tx)
  key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, *args, key)
  state_sh = sharding.tree_shardings(abstract, mesh, config.sharding)
  init_fn = functools.partial(jax.jit(init, out_shardings=state_sh), *args)
  return StateSpec(init_fn=init_fn, abstract=_with_shardings(abstract, state_sh))


def lower_train_step(s: Setup) -> TrainStep:
  """The jitted, donated train step lowered for the mesh (`.step`), with the state's init and abstract value."""
  config, plan, mesh = s.config, s.plan, s.mesh
  init_fn, abstract = state_spec(s)
  state_sh = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, s.frozen)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  step_fn = functools.partial(steps.train_step, config=config, plan=plan, model_of=s.model_of)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh, repl, repl),
                   out_shardings=(state_sh, repl), donate_argnums=0)
  size = config.model.image_size
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh)}
  key = jax.random.key(config.seed)
  schedule = schedule_values(config, s.total_steps, s.warmup_steps)
  args = (abstract, s.frozen, batch, key, schedule)
  # Its jaxpr: what XLA's count misses (cost.py). Lowered once per process for every run with the same program.
  lowered, jaxpr = memo.lowered(jitted, args, memo.program_key(config, plan, mesh, args))
  return TrainStep(step=lowered, jaxpr=jaxpr, init_fn=init_fn, abstract=abstract, key=key, schedule=schedule)


def compile_train_step(s: Setup) -> TrainStep:
  """The jitted, donated, AOT-compiled train step, with the state's init and abstract value."""
  lowered = lower_train_step(s)
  return lowered._replace(step=lowered.step.compile())


