"""Deep Incubation against end-to-end training at equal FLOPs, over depths and seeds, on real photographs.

    python benchmarks/depth_study.py [--out=benchmarks/results/depth_study] [--depths=4,8,16,32,64] [--seeds=0,1,2]

For each seed, one meta run (`modassem train --config=configs/cifar_study.py:meta`, OUT/runs/meta_seedS): the meta
model has one block per module whatever the depth, so it is the same model at every depth and is trained once. Then
for each depth one `modassem pipeline --config=configs/cifar_study.py --config.meta=THAT_RUN` (incubation of the four
modules, assembly, and e2e given the method's FLOPs, the shared meta run's counted in them) in its own run directory
under OUT/runs; rerunning this resumes where it stopped, and finished runs are not run again (their wall times are
kept in OUT/walls.json). OUT/results.json is committed and the run directories are not: a run it records from the
same code commit is not run again either, so the study goes on where it stopped on another machine (a seed's meta
model is trained again there only if one of its depths is left). `--code=DIR` runs the modassem of another checkout
of this repository (`git worktree add DIR COMMIT`), so that every run of the table is of one commit while this
driver changes. Where the gain's standard deviation over the seeds exceeds `--spread` (2 points) at a depth,
`--extra_seeds` (3 and 4) are run there too.
After each finished pipeline, OUT/results.json, OUT/results.md and OUT/depth.png are written again from all the
finished ones: top-1 of the assembled model and of e2e against depth (mean and spread over seeds), the gain with its
spread, and per run the command, seed, FLOPs and wall time.

Data: the CIFAR-10 JPEGs in ../shared/data (extracted to OUT/cifar10: the train split, and `--eval_per_class`
test images per class), of which the class-balanced `--fraction` of the train split is used; `--data=DIR` takes
any image folder with train/ and test/ (users get CIFAR through TFDS: `--data=tfds`), `--data=digits` the
built-in digits (for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

from _runs import REPO, code_commit, command_line, extract_cifar10, fmt, nice_for_the_whole_session, run, summary


def data_flags(a) -> list[str]:
  if a.data == "digits":
    return ["--config.data.name=digits", "--config.data.augment=none"]
  if a.data == "tfds":
    return [f"--config.data.train_fraction={a.fraction}"]
  return ["--config.data.name=folder", f"--config.data.path={a.data_dir}", "--config.data.tfds_name=",
          f"--config.data.train_fraction={a.fraction}"]


def common_flags(a, seed: int) -> list[str]:
  """Seed, data, and what was given on the command line (else the preset's): the same for meta and pipelines."""
  given = {"model.width": a.width, "model.heads": a.heads, "batch_size": a.batch, "unit_epochs": a.unit_epochs,
           "eval_every_steps": a.eval_every, "model.dtype": a.dtype}
  return ([f"--config.seed={seed}", "--config.progress=off", *data_flags(a)]
          + [f"--config.{k}={v}" for k, v in given.items() if v is not None])


def meta_argv(a, seed: int, work: str) -> list[str]:
  return ["train", f"--config={a.config}:meta", *common_flags(a, seed), f"--workdir={work}"]


def pipeline_flags(a, depth: int, seed: int, meta: str) -> list[str]:
  """The pipeline's flags: depth, the seed's shared meta run, and the flags every run of the seed has."""
  per = depth // 4
  return [f"--config={a.config}", f"--config.model.depth={depth}", f"--config.model.depths=({per},{per},{per},{per})",
          f"--config.meta={meta}", *common_flags(a, seed)]


def read_run(work: str) -> dict:
  with open(os.path.join(work, "report.json")) as f:
    r = json.load(f)
  return {"meta": r["phases"]["meta"]["top1"], "meta_shared": r.get("meta_shared", False),
          "meta_flops": r["phases"]["meta"]["train_flops"], "e2e_steps": r["phases"]["e2e"]["steps"],
          "assembled": r["assembled"]["top1"], "before_fine_tuning": r["phases"]["assemble"]["top1_before_fine_tuning"],
          "e2e": r["e2e"]["top1"], "gain": r["top1_gain"], "method_flops": r["assembled"]["train_flops"],
          "e2e_flops": r["e2e"]["train_flops"], "flops_ratio": r["e2e"]["train_flops"] / r["assembled"]["train_flops"],
          "method_wall_s": r["assembled"]["wall_s"], "e2e_wall_s": r["e2e"]["wall_s"]}


def tabulate(a, runs: dict) -> dict:
  """Per depth: mean and spread over seeds of both top-1s and of the gain, and the verdicts."""
  table = {}
  for depth in sorted({d for d, _ in runs}):
    rows = [r for (d, _), r in runs.items() if d == depth]
    keys = ("meta", "assembled", "e2e", "before_fine_tuning", "gain")
    table[depth] = {k: summary([r[k] for r in rows]) for k in keys}
    gain = table[depth]["gain"]
    # Beyond the seed spread: the mean gain exceeds its standard deviation over seeds.
    table[depth].update(gain_beyond_spread=None if gain["std"] is None else abs(gain["mean"]) > gain["std"],
                        seeds=len(rows))
  means = [table[d]["gain"]["mean"] for d in sorted(table)]
  grows = None if len(means) < 2 else all(b > a for a, b in zip(means, means[1:]))
  return {"by_depth": table, "gain_grows_with_depth": grows}


def write(a, runs: dict, commands: dict) -> dict:
  summary_ = tabulate(a, runs)
  result = {"setup": {k: v for k, v in vars(a).items() if k != "setup"}, "runs_setup": a.setup, "commands": commands,
            "runs": {f"depth{d}_seed{s}": r for (d, s), r in sorted(runs.items())}, **summary_}
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  by = summary_["by_depth"]
  verdict = lambda t: ("- (one seed)" if t["gain_beyond_spread"] is None else
                       ("yes" if t["gain_beyond_spread"] and t["gain"]["mean"] > 0 else
                        "no: below e2e beyond the spread" if t["gain_beyond_spread"] else "no: within the spread"))
  m, c = a.setup["model"], a.setup
  lines = ["# Deep Incubation against end-to-end training at equal FLOPs, over depth", "",
           f"ViT of width {m['width']} ({m['heads']} heads, {m['patch']}-px patches, {m['image_size']} px) cut into "
           f"{len(m['depths'])} modules, on {describe(a)}; phases as `{os.path.relpath(a.config, a.code if a.config.startswith(a.code + os.sep) else REPO)}` sets them "
           f"(incubation {c['incubate_steps']} steps, meta {c['meta_steps']}, assembly {c['assemble_steps']}, of "
           f"batch {c['batch_size']}), e2e given the method's FLOPs. Top-1 % on the held-out images, mean ± "
           "standard deviation over seeds; the gain is assembled minus e2e, per seed, and it is beyond the seed spread "
           "where its mean is farther from zero than its standard deviation.", "",
           "| depth | seeds | assembled | before fine-tuning | e2e | gain | gain positive beyond the seed spread |",
           "|---|---|---|---|---|---|---|"]
  for d, t in by.items():
    lines.append(f"| {d} | {t['seeds']} | {fmt(t['assembled'])} | {fmt(t['before_fine_tuning'])} | {fmt(t['e2e'])} "
                 f"| {fmt(t['gain'])} | {verdict(t)} |")
  grows = summary_["gain_grows_with_depth"]
  gains = ", ".join(f"{t['gain']['mean']:+.2f} at depth {d}" for d, t in by.items())
  below = all(t["gain"]["mean"] < 0 for t in by.values())
  lines += ["", "The gain grows with depth: " + ("- (one depth)" if grows is None else
                                                 "yes, the deficit to e2e shrinks" if grows and below else
                                                 "yes" if grows else "no") + f" (mean gain {gains}).", "",
            "| run | meta model | assembled | e2e | e2e steps | method FLOPs | e2e FLOPs / method's | method wall "
            "| e2e wall |",
            "|---|---|---|---|---|---|---|---|---|"]
  for (d, s), r in sorted(runs.items()):
    lines.append(f"| depth {d}, seed {s} | {r['meta']:.2f} | {r['assembled']:.2f} | {r['e2e']:.2f} | {r['e2e_steps']} "
                 f"| {r['method_flops']:.3g} | {r['flops_ratio']:.3f} | {r['method_wall_s'] / 60:.1f} min "
                 f"| {r['e2e_wall_s'] / 60:.1f} min |")
  commits = sorted({r["commit"] for r in runs.values() if r.get("commit")})
  lines += ["", "Each seed's meta model was trained once and shared by its pipelines at every depth "
            "(`--config.meta`); its training FLOPs are in every depth's method FLOPs, and so in e2e's budget. "
            "Wall times were taken with other work on the machine beside the study (run at low priority), so they "
            "are not comparable with each other: FLOPs are the measure of cost. "
            + (f"Every run is of modassem at commit {commits[0]}." if len(commits) == 1 else
               f"The runs are of modassem at commits {', '.join(commits)}." if commits else "")
            + f" Where the gain's standard deviation over seeds {a.seeds} exceeded {a.spread:g} points, seeds "
              f"{a.extra_seeds} were added at that depth.",
            "", "Commands (`python -m modassem ...`, from the repository):", ""]
  seeds = sorted({s for _, s in runs})
  lines += [f"- meta_seed{s}: `{commands[f'meta_seed{s}']}`" for s in seeds if f"meta_seed{s}" in commands]
  lines += [f"- depth{d}_seed{s}: `{commands[f'depth{d}_seed{s}']}`" for d, s in sorted(runs)]
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(a, by)
  return result


def setup_of(work: str) -> dict:
  """What the runs were: the model and batch from the incubation's config, each phase's steps."""
  cfg = {p: json.load(open(os.path.join(work, p, "config.json"))) for p in ("incubate", "assemble")}
  where = {"meta": cfg["incubate"]["meta"], **{p: os.path.join(work, p) for p in cfg}}
  steps = {p: json.load(open(os.path.join(d, "results.json")))["steps"] for p, d in where.items()}
  return {"model": cfg["incubate"]["model"], "batch_size": cfg["incubate"]["batch_size"],
          **{f"{p}_steps": n for p, n in steps.items()}}


def describe(a) -> str:
  if a.data == "digits":
    return "the built-in digits"
  return f"a class-balanced {a.fraction:g} of CIFAR-10's train split" + (
      f" (held out: {a.eval_per_class} test images per class)" if not a.data else "")


def plot(a, by: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  depths = sorted(by)
  err = lambda key: [by[d][key]["std"] or 0.0 for d in depths]
  mean = lambda key: [by[d][key]["mean"] for d in depths]
  fig, (ax, ax_gain) = plt.subplots(1, 2, figsize=(10, 4))
  ax.errorbar(depths, mean("assembled"), yerr=err("assembled"), marker="o", capsize=4, label="assembled")
  ax.errorbar(depths, mean("e2e"), yerr=err("e2e"), marker="s", capsize=4, label="e2e, same FLOPs")
  # The meta model is the same at every depth (its blocks are one per module); its top-1 is what the modules
  # were incubated against.
  ax.errorbar(depths, mean("meta"), yerr=err("meta"), color="grey", linestyle="--", capsize=4, label="meta model")
  ax.set(xlabel="depth (blocks)", ylabel="held-out top-1 (%)", title="top-1 against depth", xscale="log", xticks=depths)
  ax.legend()
  ax_gain.errorbar(depths, mean("gain"), yerr=err("gain"), marker="o", capsize=4, color="C2")
  ax_gain.axhline(0.0, color="grey", linewidth=0.8)
  ax_gain.set(xlabel="depth (blocks)", ylabel="assembled minus e2e (points)", title="gain, mean ± std over seeds",
              xscale="log", xticks=depths)
  for axis in (ax, ax_gain):   # the depths as labels, no log-scale minor ticks between them
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.set_xticklabels([str(d) for d in depths])
  fig.tight_layout()
  fig.savefig(os.path.join(a.out, "depth.png"), dpi=100)
  plt.close(fig)


def recorded(out: str, commit: str) -> tuple[dict, dict, dict | None]:
  """The finished runs OUT/results.json holds from the same code (runs, their commands, the runs' setup): the
  results are committed and the run directories are not, so a study goes on where it stopped on another machine.
  Runs of other code are run again: every run of the table comes from one commit."""
  path = os.path.join(out, "results.json")
  if not os.path.isfile(path):
    return {}, {}, None
  with open(path) as f:
    r = json.load(f)
  runs = {}
  for name, row in r.get("runs", {}).items():
    if row.get("commit") == commit:
      depth, seed = (int(x) for x in re.fullmatch(r"depth(\d+)_seed(\d+)", name).groups())
      runs[(depth, seed)] = row
  commands = {k: v for k, v in r.get("commands", {}).items()
              if k in {f"depth{d}_seed{s}" for d, s in runs} | {f"meta_seed{s}" for _, s in runs}}
  return runs, commands, r.get("runs_setup") if runs else None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "depth_study"))
  p.add_argument("--data", default="", help="an image folder, 'tfds' or 'digits'; default: the CIFAR-10 JPEGs")
  p.add_argument("--depths", default="4,8,16,32,64")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--extra_seeds", default="3,4",
                 help="seeds added at a depth where the gain's standard deviation over --seeds exceeds --spread")
  p.add_argument("--spread", type=float, default=2.0, help="points of the gain's standard deviation (see above)")
  p.add_argument("--code", default=REPO,
                 help="the modassem checkout the runs use (this one by default; a worktree at one commit keeps "
                      "every run of the table on the same code)")
  p.add_argument("--fraction", type=float, default=0.1, help="class-balanced share of the train split")
  p.add_argument("--config", help="the preset file (the code's configs/cifar_study.py)")
  p.add_argument("--width", type=int, help="model width (the preset's: 64)")
  p.add_argument("--heads", type=int, help="attention heads (the preset's: 2)")
  p.add_argument("--batch", type=int, help="global batch (the preset's: 128)")
  p.add_argument("--unit_epochs", type=float, help="epochs of incubation; meta 3x, assembly 1x (the preset's: 4)")
  p.add_argument("--eval_every", type=int, help="steps between evaluations (the preset's: once per epoch)")
  p.add_argument("--dtype", help="compute dtype (the preset's: float32)")
  p.add_argument("--eval_per_class", type=int, default=200)
  a = p.parse_args(argv)
  nice_for_the_whole_session()
  try:
    depths, seeds = [int(d) for d in a.depths.split(",") if d], [int(s) for s in a.seeds.split(",") if s]
    extra = [int(s) for s in a.extra_seeds.split(",") if s]
  except ValueError:
    p.error(f"--depths={a.depths} --seeds={a.seeds} --extra_seeds={a.extra_seeds}: comma-separated integers, as in "
            "--depths=4,8,16 --seeds=0,1,2")
  if any(d % 4 or d <= 0 for d in depths):
    p.error(f"--depths={a.depths}: every depth must be a positive multiple of 4 (4 modules of equal depth)")
  # The runs start in the checkout `--code`: every path they are given is absolute.
  a.code, a.out = os.path.abspath(a.code), os.path.abspath(a.out)
  if not os.path.isdir(os.path.join(a.code, "modassem")):
    p.error(f"--code={a.code} is not a modassem checkout (no modassem/ in it): pass one, e.g. a git worktree")
  a.config = os.path.abspath(a.config) if a.config else os.path.join(a.code, "configs", "cifar_study.py")
  os.makedirs(a.out, exist_ok=True)
  a.data_dir = os.path.abspath(a.data) if a.data not in ("", "digits", "tfds") else os.path.join(a.out, "cifar10")
  if not a.data:
    extract_cifar10(a.data_dir, a.eval_per_class)
  a.commit = code_commit(a.code)
  runs, commands, a.setup = recorded(a.out, a.commit)
  if runs:
    print(f"{len(runs)} runs of commit {a.commit} recorded in {a.out}/results.json: not run again", flush=True)
  done = os.path.join(a.out, "runs")

  def study(seed: int, depths_: list) -> None:
    meta = os.path.join(done, f"meta_seed{seed}")
    todo = [d for d in depths_ if (d, seed) not in runs]
    if not todo:
      return
    argv = meta_argv(a, seed, meta)
    run(argv, a.out, f"meta_seed{seed}", done=os.path.join(meta, "results.json"), code=a.code)
    commands[f"meta_seed{seed}"] = command_line(argv, a.code)
    for depth in todo:
      name = f"depth{depth}_seed{seed}"
      argv = ["pipeline", *pipeline_flags(a, depth, seed, meta), f"--workdir={os.path.join(done, name)}"]
      run(argv, a.out, name, done=os.path.join(done, name, "report.json"), code=a.code)
      commands[name] = command_line(argv, a.code)
      runs[(depth, seed)] = dict(read_run(os.path.join(done, name)), commit=a.commit)
      a.setup = setup_of(os.path.join(done, name))
      write(a, runs, commands)

  # Seeds outermost: a study stopped part-way has every depth at the same number of seeds.
  for seed in seeds:
    study(seed, depths)
  # Deep assemblies vary from run to run: where the gain's spread over the seeds is wider than --spread, more seeds.
  for seed in extra:
    wide = [d for d in depths if len(g := [runs[(d, s)]["gain"] for s in seeds if (d, s) in runs]) > 1
            and statistics.stdev(g) > a.spread]
    study(seed, wide)
  if runs:
    write(a, runs, commands)
    print(open(os.path.join(a.out, "results.md")).read())


if __name__ == "__main__":
  main()
