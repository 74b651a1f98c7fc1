"""Training cost: FLOPs of a train step from XLA's cost analysis, and `modassem plan`, the cost of every
phase of a preset before any run.

    modassem plan --config=configs/vit_h.py [--config.FIELD=VALUE ...] [--num_train=N] [--out=FILE.json]

A step is counted on its lowered program: the global computation of one
step on the whole batch, as JAX hands it to XLA, before XLA's
backend-specific rewriting. That count needs no compilation (ViT-H plans on
a laptop in seconds), is the same whatever the number of devices, and is
what the trainer records in `results.json`, so a plan, a run and the
equal-FLOPs baseline of the pipeline all use one measure.

For each phase (meta, incubation of each module, assembly, and the e2e
baseline) the report lowers the trainer's real train step against abstract
values (no data is read and no parameter is allocated), and multiplies its
FLOPs by the phase's step count from its epochs. The result is the method's
cost against end-to-end training, next to the ratio the paper measured in
A100 GPU-hours.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import sys
import time
import weakref

import jax
from jax.extend import core as jcore

from modassem import config as config_lib, files, flags, phases, prepare
from modassem.errors import ModassemError
from modassem.models.vit import unstack_blocks


# --- FLOPs of a step ----------------------------------------------------------

# Each lowered program's count, while it is alive: a train step lowered once per process (memo.py) serves every run
# with that program, and its analysis (the program converted to HLO and walked) is then made once too.
_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered program from XLA's cost analysis (the global program: all devices' work together)."""
  try:
    return _COUNTED[lowered]
  except (KeyError, TypeError):
    pass
  cost = lowered.cost_analysis()
  # Older JAX versions return one dict per program, newer ones the dict.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  try:
    _COUNTED[lowered] = flops
  except TypeError:   # not weakly referable: counted again next time
    pass
  return flops


def unrolled(s: prepare.Setup) -> prepare.Setup | None:
  """`s` with its step's loops written out (no scan over blocks, no accumulation scan), or None if it has none.

  XLA's cost analysis counts a loop's body once whatever its trip count, so a
  step with loops is counted on this equivalent loop-free step: the same
  work, since accumulation only splits the batch. Sources are left out (a
  fresh init lowers to the same step) and frozen modules become shapes.
  """
  c = s.config
  if not phases.scans(c) and c.accum_steps == 1:
    return None
  c = copy.deepcopy(c)
  with c.unlocked():
    c.model.scan = False
    c.accum_steps = 1
  frozen = {name: prepare.placed(tree, s.mesh, c) for name, tree in jax.eval_shape(unstack_blocks, s.frozen).items()}
  return dataclasses.replace(s, config=c, model_of=functools.partial(phases.model_for, c, devices=s.mesh.size),
                             frozen=frozen, sources=None)


def _ragged_dots(jaxpr):
  """Every `ragged_dot_general` of `jaxpr` and of the jaxprs nested in it whose result is used: lowering leaves
  the others out of the program (the forward dot of a VJP, say)."""
  live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
      if eqn.primitive.name == "ragged_dot_general":
        yield eqn
      for sub in jcore.jaxprs_in_params(eqn.params):
        yield from _ragged_dots(sub)


def ragged_dot_flops(eqn) -> float:
  """What a ragged dot computes: each row of the left operand meets the matrix of its one group, so
  2 x |lhs| x the right operand's free size (its dimensions that are neither contracted, batch nor group)."""
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  dims = eqn.params["ragged_dot_dimension_numbers"]
  (_, rhs_contracting), (_, rhs_batch) = dims.dot_dimension_numbers
  bound = {*rhs_contracting, *rhs_batch, *dims.rhs_group_dimensions}
  # With the experts split over devices (moe.experts_apply_sharded) a ragged dot is one device's, in its shapes, as
  # XLA counts it there (once, not per device); its left operand is that device's receive buffer, room for every
  # assignment of the step, and so its count is the work of all devices' real rows.
  return 2.0 * math.prod(lhs.shape) * math.prod(n for i, n in enumerate(rhs.shape) if i not in bound)


def ragged_dot_correction(jaxpr) -> float:
  """What XLA's count of a step misses on its ragged dots (the sparse MoE MLPs): the FLOPs they compute less
  those counted for them.

  XLA counts a ragged dot as the dense work it is lowered to (on CPU, every
  row against every group's matrix: the number of experts times too many). Each
  one is lowered alone, with the operands' shapes, to find what the step's
  count holds for it.
  """
  correction, counted = 0.0, {}   # XLA's count per kind of dot: a model's MoE layers repeat a few shapes
  for eqn in _ragged_dots(getattr(jaxpr, "jaxpr", jaxpr)):   # a ClosedJaxpr's jaxpr, or a Jaxpr
    operands = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    params = {**eqn.params, "out_sharding": None} if "out_sharding" in eqn.params else eqn.params
    kind = repr((operands, sorted(params.items())))
    if kind not in counted:
      alone = jax.jit(lambda *xs, p=eqn.primitive, kw=params: p.bind(*xs, **kw)).lower(*operands)
      counted[kind] = lowered_flops(alone)
    correction += ragged_dot_flops(eqn) - counted[kind]
  return correction


def train_step_flops(s: prepare.Setup, step: prepare.TrainStep | None = None) -> float:
  """FLOPs of one train step of `s` from XLA's cost analysis of its lowered program, its ragged dots counted as
  what they compute (`ragged_dot_correction`).

  `step` is the step as the trainer lowers it (lowered here when not given).
  A step with loops is counted on its `unrolled` twin, also lowered only:
  compiling it would cost the time the scan saves.
  """
  twin = unrolled(s)
  if twin is not None:
    step = prepare.lower_train_step(twin)
  elif step is None:
    step = prepare.lower_train_step(s)
  return lowered_flops(step.step) + ragged_dot_correction(step.jaxpr)


def step_flops(config) -> float:
  """FLOPs of one train step of `config`, lowered against shapes (`phase_step_flops`): reads no data and no module,
  compiles nothing. The schedule's numbers are arguments of the step, so any length prices the same program."""
  return phase_step_flops(config, 1, 0)


# --- the cost report ----------------------------------------------------------

# Train-split sizes of the datasets the presets use, so a plan needs no data on
# disk. ImageNet-1K's is its official count; digits is the 80 % train part of
# scikit-learn's 1,797 images (the split modassem uses).
KNOWN_TRAIN_SIZES = {
    "imagenet2012": 1_281_167,
    "cifar100": 50_000,
    "cifar10": 50_000,
    "digits": 1_437,
}

# The paper's training cost in A100 GPU-hours: (Deep Incubation, e2e), by preset.
PAPER_GPU_HOURS = {
    "vit_b16": (390, 290),
    "vit_l16": (890, 1090),
    "vit_h14": (2720, 4790),
}

METHOD_NOTE = ("The paper's figures are wall-clock A100 GPU-hours, not FLOPs: they also count "
               "input pipelines, communication and how well each phase used the GPUs.")


def dataset_key(data) -> str:
  # A TFDS dataset is named by tfds_name; the built-in sources by their name.
  return str(data.tfds_name) if str(data.name) == "tfds" else str(data.name)


def num_train_of(data, override: int | None = None) -> int:
  """Train examples per epoch: the override, or the known size of `data`'s dataset."""
  if override:
    return int(override)
  key = dataset_key(data)
  if key not in KNOWN_TRAIN_SIZES:
    raise ModassemError(f"the train-set size of dataset {key!r} is unknown: pass --num_train=N "
                        f"(known: {', '.join(sorted(KNOWN_TRAIN_SIZES))})")
  # The subset is class-balanced, so its size is the fraction to within a few examples.
  return int(round(KNOWN_TRAIN_SIZES[key] * float(data.train_fraction)))


def phase_steps(config, num_train: int) -> tuple[int, int]:
  """(total, warmup) steps of `config`'s phase, the trainer's rule with `num_train` examples."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ModassemError(f"batch size {config.batch_size} does not fit the {num_train} train examples: "
                        f"lower --config.batch_size")
  return prepare.schedule_lengths(config, steps_per_epoch)


def phase_names(num_modules: int) -> list[str]:
  return ["meta"] + [f"incubate{i}" for i in range(num_modules)] + ["assemble", "e2e"]


def phase_config(path: str, name: str, overrides: dict):
  """The config of phase `name` (incubateI: module I alone, as each of the K runs trains)."""
  phase = "incubate" if name.startswith("incubate") else name
  config = config_lib.load(f"{path}:{phase}", config_lib.phase_overrides(overrides, phase))
  if phase == "incubate":
    config.module = name[len("incubate"):]
    # The trainer's checks want the meta run an incubation builds on; a plan reads none.
    config.meta = config.meta or "(not read)"
  return config


def phase_step_flops(config, total_steps: int, warmup_steps: int) -> float:
  """FLOPs of one train step of `config`, from its lowered step; reads no data, allocates no parameters. The step is
  set up by the trainer's own code (`prepare.abstract_setup`), so a plan prices what a run trains."""
  return train_step_flops(prepare.abstract_setup(config, total_steps, warmup_steps))


def summarize(preset: str, num_modules: int, flops: dict, steps: dict) -> dict:
  """Per-phase totals and shares, the method's and e2e's totals, their ratio and the paper's."""
  method_names = [n for n in phase_names(num_modules) if n != "e2e"]
  method = sum(flops[n] * steps[n] for n in method_names)
  e2e = flops["e2e"] * steps["e2e"]
  rows = {}
  for n in phase_names(num_modules):
    total = flops[n] * steps[n]
    rows[n] = {"step_flops": flops[n], "steps": steps[n], "total_flops": total,
               "share": total / method if n != "e2e" else None}
  paper = PAPER_GPU_HOURS.get(preset)
  return {"preset": preset, "num_modules": num_modules, "phases": rows, "method_flops": method, "e2e_flops": e2e,
          "ratio": method / e2e, "paper_gpu_hours": list(paper) if paper else None,
          "paper_ratio": paper[0] / paper[1] if paper else None}


def markdown(r: dict) -> str:
  k = r["num_modules"]
  lines = [f"Training cost of {r['preset']} (K={k}), FLOPs from XLA's cost analysis of each lowered train step",
           "", "| phase | FLOPs/step | steps | total FLOPs | share of method |", "|---|---|---|---|---|"]
  for name, x in r["phases"].items():
    share = f"{100 * x['share']:.1f} %" if x["share"] is not None else "-"
    lines.append(f"| {name} | {x['step_flops']:.3e} | {x['steps']} | {x['total_flops']:.3e} | {share} |")
  paper = "-"
  if r["paper_ratio"] is not None:
    ours, e2e = r["paper_gpu_hours"]
    paper = f"{ours} / {e2e} = {r['paper_ratio']:.2f}"
  lines += ["", f"- method (meta + {k} incubations + assembly): {r['method_flops']:.3e} FLOPs",
            f"- e2e: {r['e2e_flops']:.3e} FLOPs",
            f"- method / e2e: {r['ratio']:.3f} (FLOPs); paper, A100 GPU-hours: {paper}",
            "", METHOD_NOTE]
  return "\n".join(lines) + "\n"


def schedule(spec: str, overrides: dict | None = None, num_train: int | None = None):
  """(first phase's config, train examples per epoch, {phase name: (config, total steps, warmup steps)})."""
  path, _ = config_lib.split_spec(spec)
  overrides = dict(overrides or {})
  first = phase_config(path, "meta", overrides)
  n = num_train_of(first.data, num_train)
  phases_ = {}
  for name in phase_names(int(first.model.num_modules)):
    config = phase_config(path, name, overrides)
    phases_[name] = (config, *phase_steps(config, n))
  return first, n, phases_


def cost_report(spec: str, overrides: dict | None = None, num_train: int | None = None, *, log=None) -> dict:
  """The cost report of the preset in `spec` (its phase, if any, is ignored: every phase is planned)."""
  first, n, planned = schedule(spec, overrides, num_train)
  flops, steps = {}, {}
  for name, (config, total, warmup) in planned.items():
    t0 = time.perf_counter()
    flops[name] = phase_step_flops(config, total, warmup)
    steps[name] = total
    if log:
      log(f"{name}: {flops[name]:.3e} FLOPs/step x {total} steps (lowered in {time.perf_counter() - t0:.1f} s)")
  report = summarize(str(first.preset), int(first.model.num_modules), flops, steps)
  report.update(num_train=n, batch_size=int(first.batch_size), dataset=dataset_key(first.data))
  return report


def _flags(argv: list[str], parse: bool = True):
  """`--config` with typed overrides, `--num_train` and `--out` (`parse=False`: defined only, for `--help`)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  fv = flags.config_flag_values(argv, "configs/vit_h.py", phased=False)
  absl_flags.DEFINE_integer("num_train", None, "train examples per epoch (default: the dataset's known size)",
                            lower_bound=1, flag_values=fv)
  absl_flags.DEFINE_string("out", None, "also write the numbers to this JSON file", flag_values=fv)
  if not parse:
    return fv
  fv(["modassem"] + argv)
  if not fv["config"].present:
    raise ValueError("--config is required, e.g. --config=configs/vit_b.py")
  return fv


def main(argv: list[str]) -> int:
  """`modassem plan ...`: prints the Markdown report; returns the exit status."""
  try:
    fv = _flags(argv)
  except flags.parse_errors() as e:
    return flags.fail("plan", flags.parse_error_message(argv, e))
  spec, overrides = flags.config_spec(fv)
  try:
    report = cost_report(spec, overrides, fv.num_train, log=lambda line: print(line, file=sys.stderr, flush=True))
  except ModassemError as e:
    return flags.fail("plan", str(e))
  print(markdown(report), end="", flush=True)
  if fv.out:
    out = files.path(fv.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(out, json.dumps(report, indent=2))   # phases in their order, not sorted
  return 0
