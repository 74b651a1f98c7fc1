"""m2mKD against plain incubation on real photographs (CIFAR-10 JPEGs), with the e2e baseline at equal FLOPs.

    python benchmarks/m2mkd_cifar.py --out=benchmarks/results/m2mkd_cifar10 [--seeds=0,1,2] [--smoke]
    python benchmarks/m2mkd_cifar.py --experts=4 --k=2     # V-MoE students (OUT: .../m2mkd_cifar10_vmoe)

1. A teacher: the dense target model trained end to end (`modassem train ...:e2e`, seed 0).
2. For each seed, one `modassem pipeline --compare_plain --config.teacher=TEACHER`: the meta model, incubation
   against the teacher (m2mKD) and plain incubation from the same meta model with the same steps and seed, both
   assembled, and the e2e baseline given the m2mKD method's FLOPs. With `--experts=E` the students (and e2e) are
   V-MoE models, an MoE MLP of E experts (top `--k`, the reference's routing) in every block; the meta model and
   the teacher stay dense, as in m2mKD.
3. `OUT/results.json` and `OUT/results.md`: per seed and as mean and spread, the assembled top-1 before and after
   fine-tuning for both incubations, e2e's, the teacher's, FLOPs and wall times, and the commands that made them.

Every step is a modassem command in its own run directory under OUT/runs, so rerunning this resumes where it stopped
(finished runs are skipped). Each seed's results go into OUT/results.json as it lands, with the commit of the code
that ran them (`--code=DIR`: another checkout's modassem, pinned while this one changes): a seed recorded there
from the same code and setup is not run again, so the study goes on where it stopped on another machine. The data
is the class-balanced `--fraction` of CIFAR-10's train split (image-folder layout, `data.train_fraction`) and the
first `--eval_per_class` test images of each class, extracted from ../shared/data/cifar10-jpeg.tar.gz (not part of
the project; users get CIFAR through TFDS or an image folder of their own: pass `--data=DIR`).
"""

from __future__ import annotations

import argparse
import json
import os

from _runs import REPO, code_commit, command_line, extract_cifar10, fmt, nice_for_the_whole_session, run, summary

CONFIG = os.path.join(REPO, "configs", "deit_t32_cifar.py")


def model_flags(a) -> list[str]:
  """A deep, narrow ViT on 32-px CIFAR-10 images (4-px patches), cut into 4 modules."""
  per = a.depth // 4
  return [f"--config.model.width={a.width}", f"--config.model.heads={a.heads}", f"--config.model.depth={a.depth}",
          f"--config.model.depths=({per},{per},{per},{per})", "--config.model.num_classes=10",
          "--config.model.dtype=float32", f"--config.batch_size={a.batch}", f"--config.eval_batch_size={a.batch * 4}",
          "--config.data.name=folder", f"--config.data.path={a.data_dir}", "--config.data.tfds_name=",
          f"--config.data.train_fraction={a.fraction}", "--config.progress=off", *recipe_flags(a)]


def student_flags(a) -> list[str]:
  """The students' (and e2e's) MoE MLPs: every block, E experts, top k, the reference's routing; none if dense."""
  if not a.experts:
    return []
  return [f"--config.model.moe.experts={a.experts}", f"--config.model.moe.k={a.k}", "--config.model.moe.every=1"]


def recipe_flags(a) -> list[str]:
  """A recipe for a schedule of a few epochs. DeiT's regularisers (RandAugment, Mixup/CutMix, erasing, repeated
  augmentation, stochastic depth) pay off over hundreds of epochs and only slow learning down over a few, and its
  learning rate (5e-4 per 512 images) is set for 300 epochs; kept: AdamW, cosine schedule, label smoothing, padded
  crop and flip."""
  return ["--config.data.randaugment=", "--config.data.random_erase=0", "--config.data.repeated_aug=1",
          "--config.mixup=0", "--config.cutmix=0", "--config.model.drop_path=0",
          f"--config.optim.lr={a.lr}", f"--config.optim.lr_base_batch={a.batch}"]


def phase_steps(a) -> list[str]:
  """Steps of every phase of the pipeline (e2e: as many as the m2mKD method's FLOPs buy)."""
  return [f"--config.total_steps={a.steps}", f"--config.warmup_steps={max(1, a.steps // 10)}",
          f"--config.log_every_steps={max(1, a.steps // 20)}", f"--config.checkpoint_every_steps={max(1, a.steps // 4)}",
          f"--config.eval_every_steps={a.steps}"]


# What must match for a recorded seed to stand in the table (the rest of the setup names paths and seeds).
SETUP_KEYS = ("fraction", "width", "heads", "depth", "batch", "lr", "steps", "teacher_steps", "eval_per_class",
              "experts", "k")


def recorded(out: str, commit: str, setup: dict) -> dict:
  """{seed: its results} that OUT/results.json holds from the same code and setup."""
  path = os.path.join(out, "results.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    r = json.load(f)
  same = all(r.get("setup", {}).get(k) == setup[k] for k in SETUP_KEYS)
  return {int(seed): row for seed, row in r.get("per_seed", {}).items() if same and row.get("commit") == commit}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="", help="default: benchmarks/results/m2mkd_cifar10 (dense), .._vmoe (--experts)")
  p.add_argument("--data", default="", help="an image folder (train/, test/); default: the CIFAR-10 JPEGs, extracted")
  p.add_argument("--code", default=REPO, help="the checkout whose modassem runs (default: this one)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--fraction", type=float, default=0.1, help="class-balanced share of the train split")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--depth", type=int, default=12)
  p.add_argument("--experts", type=int, default=0, help="experts of the students' MoE MLPs; 0: dense students")
  p.add_argument("--k", type=int, default=2, help="experts per token")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate at --batch")
  p.add_argument("--steps", type=int, default=400, help="steps of each phase (e2e: the method's FLOPs)")
  p.add_argument("--teacher_steps", type=int, default=1600)
  p.add_argument("--eval_per_class", type=int, default=200, help="test images per class evaluated on")
  p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check the script runs")
  a = p.parse_args()
  nice_for_the_whole_session()
  if a.smoke:
    a.steps, a.teacher_steps, a.fraction, a.depth, a.width, a.seeds = 4, 4, 0.01, 8, 32, "0"
    a.eval_per_class = 10
  a.code = os.path.abspath(a.code)
  a.out = a.out or os.path.join(REPO, "benchmarks", "results", "m2mkd_cifar10" + ("_vmoe" if a.experts else ""))
  os.makedirs(a.out, exist_ok=True)
  a.data_dir = a.data or os.path.join(a.out, "cifar10")
  if not a.data:
    extract_cifar10(a.data_dir, a.eval_per_class)
  commit = code_commit(a.code)
  setup = {k: v for k, v in vars(a).items()}
  done = recorded(a.out, commit, setup)
  old = json.load(open(os.path.join(a.out, "results.json"))) if done else {}
  runs = os.path.join(a.out, "runs")
  config = os.path.join(a.code, "configs", "deit_t32_cifar.py")
  model = model_flags(a)
  seeds = [int(s) for s in a.seeds.split(",") if s]
  commands = {k: v for k, v in old.get("commands", {}).items() if k == "teacher" or int(k[4:]) in done}
  per_seed = {seed: done[seed] for seed in seeds if seed in done}
  teacher_wall = old.get("teacher_wall_s")

  teacher = os.path.join(runs, "teacher")
  teacher_cmd = ["train", f"--config={config}:e2e", *model, f"--config.total_steps={a.teacher_steps}",
                 f"--config.warmup_steps={max(1, a.teacher_steps // 10)}", "--config.seed=0",
                 f"--config.checkpoint_every_steps={max(1, a.teacher_steps // 4)}",
                 f"--config.log_every_steps={max(1, a.teacher_steps // 20)}", f"--workdir={teacher}"]
  for seed in seeds:
    if seed in per_seed:
      print(f"seed {seed}: recorded in {a.out}/results.json from {commit[:12]}: not run again", flush=True)
      continue
    # The teacher is the dense model; it is trained again only where a seed is left to run.
    teacher_wall = run(teacher_cmd, a.out, "teacher", done=os.path.join(teacher, "results.json"), code=a.code)
    commands["teacher"] = command_line(teacher_cmd, a.code)
    work = os.path.join(runs, f"seed{seed}")
    cmd = ["pipeline", f"--config={config}", *model, *student_flags(a), *phase_steps(a), f"--config.seed={seed}",
           f"--config.teacher={teacher}", "--compare_plain", f"--workdir={work}"]
    wall = run(cmd, a.out, f"seed{seed}", done=os.path.join(work, "report.json"), code=a.code)
    commands[f"seed{seed}"] = command_line(cmd, a.code)
    with open(os.path.join(work, "report.json")) as f:
      r = json.load(f)
    per_seed[seed] = {
        "m2mkd": {"before": r["phases"]["assemble"]["top1_before_fine_tuning"], "after": r["assembled"]["top1"],
                  "train_flops": r["assembled"]["train_flops"], "wall_s": r["assembled"]["wall_s"]},
        "plain": {"before": r["plain"]["top1_before_fine_tuning"], "after": r["plain"]["top1"],
                  "train_flops": r["plain"]["train_flops"]},
        "e2e": {"top1": r["e2e"]["top1"], "train_flops": r["e2e"]["train_flops"], "wall_s": r["e2e"]["wall_s"]},
        "teacher_top1": r["teacher"]["top1"], "pipeline_wall_s": wall, "commit": commit,
    }
    write_results(a, setup, commit, commands, teacher_wall, per_seed)
  write_results(a, setup, commit, commands, teacher_wall, per_seed)


def write_results(a, setup, commit, commands, teacher_wall, per_seed) -> None:
  agg = {k: summary([s[k.split(".")[0]][k.split(".")[1]] for s in per_seed.values()])
         for k in ("m2mkd.before", "m2mkd.after", "plain.before", "plain.after", "e2e.top1")}
  result = {"setup": setup, "code": f"modassem at commit {commit[:12]}" + (
                "" if a.code == REPO else ", run from a second checkout of it while this one changed"),
            "commands": commands, "teacher_wall_s": teacher_wall,
            "per_seed": {str(k): v for k, v in sorted(per_seed.items())}, "summary": agg}
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  write_table(a, result)


def write_table(a, result: dict) -> None:
  agg, per_seed = result["summary"], result["per_seed"]
  pct = lambda v: "-" if v is None else f"{v:.2f}"
  teacher = next(iter(per_seed.values()))["teacher_top1"] if per_seed else None
  student = (f"V-MoE students: in every block an MoE MLP of {a.experts} experts, top {a.k} (the reference's routing); "
             "the meta model and the teacher are the dense ViT of that shape. " if a.experts else "")
  flops = lambda key: summary([s[key]["train_flops"] for s in per_seed.values()])["mean"]
  lines = [f"# m2mKD against plain incubation on CIFAR-10 photographs" + (", V-MoE students" if a.experts else ""), "",
           f"Train: {a.fraction:g} of CIFAR-10's train split (class-balanced); test: {a.eval_per_class} images per "
           f"class of the test split. ViT width {a.width}, {a.heads} heads, depth {a.depth} in 4 modules, 4-px patches; "
           f"{a.steps} steps of batch {a.batch} per phase, e2e given the m2mKD method's FLOPs. {student}Top-1 % as mean ± "
           f"standard deviation over {len(per_seed)} seed(s).", "",
           *([f"Training FLOPs (mean): m2mKD method {flops('m2mkd'):.3g}, plain method {flops('plain'):.3g}, e2e "
              f"{flops('e2e'):.3g}; the FLOPs of MoE steps count k experts per token and the router (the work done), "
              "not every expert.", ""] if per_seed else []),
           "| model | before fine-tuning | after fine-tuning |", "|---|---|---|",
           f"| assembled, m2mKD incubation | {fmt(agg['m2mkd.before'])} | {fmt(agg['m2mkd.after'])} |",
           f"| assembled, plain incubation | {fmt(agg['plain.before'])} | {fmt(agg['plain.after'])} |",
           f"| e2e at the m2mKD method's FLOPs | | {fmt(agg['e2e.top1'])} |",
           f"| teacher ({a.teacher_steps} steps e2e, seed 0) | | {pct(teacher)} |", "",
           "Per seed (top-1 %; wall time of the whole pipeline on this machine, taken under the load of other work: FLOPs, "
           "not these, are the measure):", "",
           "| seed | m2mKD before | m2mKD after | plain before | plain after | e2e | pipeline wall |",
           "|---|---|---|---|---|---|---|"]
  for seed, s in per_seed.items():
    lines.append(f"| {seed} | {pct(s['m2mkd']['before'])} | {pct(s['m2mkd']['after'])} | {pct(s['plain']['before'])} "
                 f"| {pct(s['plain']['after'])} | {pct(s['e2e']['top1'])} | {s['pipeline_wall_s'] / 60:.0f} min |")
  teacher_wall = f"Teacher: {result['teacher_wall_s'] / 60:.0f} min. " if result["teacher_wall_s"] else ""
  lines += ["", f"{teacher_wall}Code: {result['code']}.",
            "", "Commands (`python -m modassem ...`, from the repository):", ""]
  lines += [f"- {name}: `{cmd}`" for name, cmd in result["commands"].items()]
  with open(os.path.join(a.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
