"""The whole method from one command, with its baseline and a report.

meta -> incubate (module=all) -> assemble, each in its own run directory
under WORKDIR, then the end-to-end baseline given the same number of training
FLOPs as the three phases together. Every run resumes, so rerunning the
command after an interruption picks up where it stopped.
"""

from __future__ import annotations

import io
import json

from modassem import config as config_lib, cost, files, train
from modassem.checkpoints import RESULTS_FILE
from modassem.distributed import is_main, say
from modassem.errors import ModassemError
from modassem.metrics import METRICS_FILE

METHOD = ("meta", "incubate", "assemble")


PLAIN = ("incubate_plain", "assemble_plain")


def phase_configs(spec: str, overrides: dict, workdir: str, compare_plain: bool = False) -> tuple[dict, dict]:
  """Each phase's config (with the user's overrides) and run directory; incubation and assembly wired to the runs
  before them. `compare_plain` (with a teacher) adds an incubation without the teacher and its assembly."""
  path, _ = config_lib.split_spec(spec)
  dirs = {p: files.join(workdir, p) for p in METHOD + ("e2e",)}
  configs = {}
  for phase in METHOD + ("e2e",):
    c = config_lib.load(f"{path}:{phase}", config_lib.phase_overrides(overrides, phase))
    if phase == "incubate":
      c.module = "all"
      c.meta = dirs["meta"]
    if phase == "assemble":
      c.modules = ",".join([dirs["incubate"]] * c.model.num_modules)
    configs[phase] = c
  if compare_plain:
    if not configs["incubate"].teacher:
      raise ModassemError("--compare_plain compares incubation with a teacher (m2mKD) and without: pass "
                          "--config.teacher=SOURCE too")
    dirs.update({p: files.join(workdir, p) for p in PLAIN})
    configs["incubate_plain"] = configs["incubate"].copy_and_resolve_references()
    configs["incubate_plain"].teacher = ""
    configs["assemble_plain"] = configs["assemble"].copy_and_resolve_references()
    configs["assemble_plain"].modules = ",".join([dirs["incubate_plain"]] * configs["assemble"].model.num_modules)
  return configs, dirs


def run(spec: str, overrides: dict, workdir: str, compare_plain: bool = False) -> dict:
  configs, dirs = phase_configs(spec, overrides, workdir, compare_plain)
  results = {}
  for phase in METHOD + (PLAIN if compare_plain else ()):
    say(f"== {phase} -> {dirs[phase]}")
    results[phase] = train.train(configs[phase], dirs[phase])

  budget = sum(results[p]["train_flops"] for p in METHOD)
  e2e = configs["e2e"]
  # A finished e2e run recorded its step's FLOPs (the same cost analysis); a rerun need not lower the step again.
  done = files.read_json(files.path(dirs["e2e"]) / RESULTS_FILE) or {}
  per_step = done.get("step_flops") or cost.step_flops(e2e)
  e2e.total_steps = max(int(round(budget / per_step)), 1)
  say(f"== e2e -> {dirs['e2e']}: {e2e.total_steps} steps = {budget:.3g} FLOPs, the method's budget")
  results["e2e"] = train.train(e2e, dirs["e2e"])

  report = make_report(results, dirs, teacher=str(configs["incubate"].get("teacher", "")) or None)
  if is_main():
    files.write_json(files.path(workdir) / "report.json", report)
    files.write_text(files.path(workdir) / "report.md", report_markdown(report))
    plot_curves(dirs, files.path(workdir) / "curves.png")
    print(report_markdown(report), flush=True)
  return report


def _teacher_summary(teacher: str) -> dict:
  """The teacher's own numbers, from its run's results.json (none for an official .pth)."""
  done = {} if teacher.endswith(".pth") else (files.read_json(files.path(teacher) / RESULTS_FILE) or {})
  return {"source": teacher, "top1": done.get("top1"), "top5": done.get("top5"), "train_flops": done.get("train_flops")}


def make_report(results: dict, dirs: dict, teacher: str | None = None) -> dict:
  phases = {p: {k: results[p].get(k) for k in ("top1", "top5", "loss", "steps", "train_flops", "wall_s")}
            for p in results}
  for p in phases:
    phases[p]["workdir"] = dirs[p]
  phases["assemble"]["top1_before_fine_tuning"] = _first_eval(dirs["assemble"]).get("top1")
  method_flops = sum(phases[p]["train_flops"] for p in METHOD)
  method_wall = sum(phases[p]["wall_s"] for p in METHOD)
  report = {
      "phases": phases,
      "incubated_modules": {k: v for k, v in results["incubate"].items() if k.startswith("module_")},
      "assembled": {"top1": phases["assemble"]["top1"], "top5": phases["assemble"]["top5"],
                    "train_flops": method_flops, "wall_s": method_wall},
      "e2e": {"top1": phases["e2e"]["top1"], "top5": phases["e2e"]["top5"],
              "train_flops": phases["e2e"]["train_flops"], "wall_s": phases["e2e"]["wall_s"]},
      "top1_gain": phases["assemble"]["top1"] - phases["e2e"]["top1"],
  }
  if teacher:
    # The teacher's forward passes are in the incubation's step FLOPs (XLA counts them), so in the method's
    # budget; its own training is reported here, apart.
    report["teacher"] = _teacher_summary(teacher)
  if all(p in results for p in PLAIN):
    plain = results["assemble_plain"]
    report["plain"] = {
        "top1": plain["top1"], "top5": plain["top5"],
        "top1_before_fine_tuning": _first_eval(dirs["assemble_plain"]).get("top1"),
        "train_flops": sum(results[p]["train_flops"] for p in ("meta",) + PLAIN),
        "incubated_modules": {k: v for k, v in results["incubate_plain"].items() if k.startswith("module_")},
    }
  return report


def report_markdown(r: dict) -> str:
  lines = ["# modassem pipeline report", "",
           "| phase | top-1 % | top-5 % | eval loss | steps | train FLOPs | wall s |",
           "|---|---|---|---|---|---|---|"]
  for p, v in r["phases"].items():
    lines.append(f"| {p} | {v['top1']:.2f} | {v['top5']:.2f} | {v['loss']:.4f} | {v['steps']} | "
                 f"{v['train_flops']:.3g} | {v['wall_s']:.0f} |")
  a, e = r["assembled"], r["e2e"]
  lines += ["", "| model | top-1 % | top-5 % | train FLOPs (all phases) | wall s |", "|---|---|---|---|---|",
            f"| assembled (meta + incubate + assemble) | {a['top1']:.2f} | {a['top5']:.2f} | {a['train_flops']:.3g} | "
            f"{a['wall_s']:.0f} |",
            f"| end-to-end | {e['top1']:.2f} | {e['top5']:.2f} | {e['train_flops']:.3g} | {e['wall_s']:.0f} |",
            "", f"Assembled minus end-to-end: {r['top1_gain']:+.2f} top-1 points on the held-out split."]
  before = r["phases"]["assemble"].get("top1_before_fine_tuning")
  if before is not None:
    lines.append(f"The assembled model scored {before:.2f} % top-1 before fine-tuning.")
  t = r.get("teacher")
  if t:
    own = (f"{t['top1']:.2f} % top-1, trained with {t['train_flops']:.3g} FLOPs" if t.get("top1") is not None
           else "its own accuracy not recorded (an official checkpoint)")
    lines.append(f"Incubated against the teacher {t['source']} (m2mKD): {own}. Its forward passes during "
                 f"incubation are in the method's FLOPs; its own training is not.")
  p = r.get("plain")
  if p:
    a, asm = r["assembled"], r["phases"]["assemble"]
    show = lambda v: "-" if v is None else f"{v:.2f}"
    lines += ["", "| incubation | assembled top-1 % before fine-tuning | after | train FLOPs (all phases) |",
              "|---|---|---|---|",
              f"| with the teacher (m2mKD) | {show(asm.get('top1_before_fine_tuning'))} | {a['top1']:.2f} | "
              f"{a['train_flops']:.3g} |",
              f"| plain | {show(p['top1_before_fine_tuning'])} | {p['top1']:.2f} | {p['train_flops']:.3g} |"]
  lines.append("")
  return "\n".join(lines)


def _first_eval(run_dir: str) -> dict:
  return next((r for r in _records(run_dir) if r["kind"] == "eval" and r["step"] == 0), {})


def _records(run_dir: str) -> list[dict]:
  text = files.read_text(files.path(run_dir) / METRICS_FILE) or ""
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_curves(dirs: dict, out) -> None:
  """Train loss and eval top-1 against cumulative training FLOPs: the method's phases chained, and e2e."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for label, phases in (("method", METHOD), ("e2e", ("e2e",))):
    offset = 0.0
    for p in phases:
      recs = _records(dirs[p])
      final = [r for r in recs if r["kind"] == "final"]
      per_step = final[-1]["step_flops"] if final else 0.0
      tr = [r for r in recs if r["kind"] == "train" and isinstance(r.get("loss"), float)]
      ev = [r for r in recs if r["kind"] in ("eval", "final") and isinstance(r.get("top1"), float)]
      name = f"{label}: {p}" if label == "method" else "e2e"
      ax_loss.plot([offset + r["step"] * per_step for r in tr], [r["loss"] for r in tr], label=name)
      ax_acc.plot([offset + r["step"] * per_step for r in ev], [r["top1"] for r in ev], marker="o", label=name)
      offset += (final[-1]["step"] if final else 0) * per_step
  for ax, title in ((ax_loss, "train loss"), (ax_acc, "held-out top-1 (%)")):
    ax.set_xlabel("training FLOPs")
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  files.path(out).write_bytes(png.getvalue())
