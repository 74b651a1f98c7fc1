"""The report of a method's runs and its baseline: `report.md`, `report.json` and `curves.png`.

`modassem report RUN [RUN ...]` and `modassem pipeline` both come here with run directories, whatever made them
(one pipeline, phases run by hand, `launch/*.sh`): an assembly run says which incubation runs it stacked
(config.json's `modules`), each of those which meta run it grew in and whether it had a teacher. From the
assembly, the whole chain is found; the e2e run, if given, is the baseline. Two assemblies, one of modules
incubated with a teacher and one without, are reported side by side (m2mKD against plain incubation).
"""

from __future__ import annotations

import io
import json
import os
import statistics

from modassem import files
from modassem.records import CONFIG_FILE, RESULTS_FILE, RUN_FILE, recorded_config
from modassem.errors import ModassemError
from modassem.metrics import METRICS_FILE

METHOD = ("meta", "incubate", "assemble")
PLAIN = ("incubate_plain", "assemble_plain")


def _read(run_dir: str) -> dict:
  """run.json, results.json and config.json of a finished run; one-line errors otherwise."""
  wd = files.path(run_dir)
  if not wd.is_dir():
    what = "is a file, not a run directory" if wd.exists() else "does not exist"
    raise ModassemError(f"{run_dir} {what}: pass the run directories (--workdir) of the runs to report")
  run = files.read_json(wd / RUN_FILE)
  if run is None:
    raise ModassemError(f"{run_dir} is not a run directory (no {RUN_FILE}): pass the --workdir of a modassem run")
  results = files.read_json(wd / RESULTS_FILE)
  if results is None:
    raise ModassemError(f"{run_dir} ({run.get('phase')} run) has not finished (no {RESULTS_FILE}): rerun its "
                        "command to finish it, then report")
  return {"dir": str(run_dir), "phase": run.get("phase"), "run": run, "results": results,
          "config": recorded_config(wd) or {}}


_key = files.run_key


def _resolve(path: str, given: dict, what: str, base: str) -> str:
  """A run that the run in `base` names in its config.json: where it was recorded (`files.recorded`), or one of the
  given runs whose path ends in the same path components (a run directory moved, or a copy of a run elsewhere)."""
  full = files.recorded(path, base)
  if files.path(full).is_dir():
    return full
  parts = [x for x in os.path.normpath(path).split("/") if x not in ("", ".")]
  for d in given:
    if parts and [x for x in os.path.normpath(d).split("/") if x][-len(parts):] == parts:
      return d
  raise ModassemError(f"{what} {path} (from its {CONFIG_FILE}) is not found: pass that run's directory too")


def _combined(incubations: list[dict]) -> dict:
  """One incubation phase from the runs that incubated its modules (one `module=all` run, or one per module)."""
  if len(incubations) == 1:
    return incubations[0]["results"]
  modules = {}
  for inc in incubations:
    modules.update({k: v for k, v in inc["results"].items() if k.startswith("module_")})
  out = {m: statistics.fmean(v for k, v in modules.items() if k.endswith(f"/{m}")) for m in ("top1", "top5", "loss")}
  for k in ("steps", "train_flops", "wall_s"):
    out[k] = sum(inc["results"][k] for inc in incubations)
  return {**out, **modules}


def _chain(asm: dict, given: dict) -> dict:
  """The runs an assembly stands on: its incubations (in slot order, each once) and their meta run."""
  listed = [s for s in str(asm["config"].get("modules", "")).split(",") if s]
  incs = []
  for s in listed:
    d = _resolve(s, given, f"the incubation run of {asm['dir']}", asm["dir"])
    if _key(d) not in {_key(i["dir"]) for i in incs}:
      incs.append(given.get(_key(d)) or _read(d))
  if not incs:
    raise ModassemError(f"{asm['dir']} names no incubation runs in its {CONFIG_FILE}: it is not an assembly of "
                        "incubated modules")
  metas = []
  for inc in incs:
    m = _resolve(str(inc["config"].get("meta", "")), given, f"the meta run of {inc['dir']}", inc["dir"])
    if not any(_key(m) == _key(x) for x in metas):
      metas.append(m)
  if len(metas) > 1 and not asm["config"].get("allow_mixed_meta"):
    raise ModassemError(f"{asm['dir']} stacks modules of {len(metas)} meta runs ({', '.join(metas)}) without "
                        "allow_mixed_meta: it is not an assembly modassem made; report the runs of one chain")
  meta_dir = metas[0]
  teachers = {str(i["config"].get("teacher") or "") for i in incs}
  return {"meta": given.get(_key(meta_dir)) or _read(meta_dir), "metas": metas, "incubate": incs, "assemble": asm,
          "teacher": next(iter(teachers)) if len(teachers) == 1 else ",".join(sorted(teachers))}


def collect(run_dirs: list[str]) -> tuple[dict, dict, str | None]:
  """(results, dirs, teacher) by phase, as `make_report` takes them, from any set of run directories that holds an
  assembly run (two for m2mKD against plain incubation) and, for the comparison, an e2e run."""
  given = {}
  for d in run_dirs:
    given.setdefault(_key(d), _read(d))
  by_phase = {}
  for r in given.values():
    by_phase.setdefault(r["phase"], []).append(r)
  assemblies, e2e = by_phase.get("assemble", []), by_phase.get("e2e", [])
  if not 1 <= len(assemblies) <= 2:
    raise ModassemError(f"{len(assemblies)} assembly runs given: pass one (its incubation and meta runs are found "
                        "from it) or two (with and without a teacher), and the e2e run to compare with")
  if len(e2e) > 1:
    raise ModassemError(f"{len(e2e)} e2e runs given ({', '.join(r['dir'] for r in e2e)}): pass one baseline")
  chains = [_chain(a, given) for a in assemblies]
  if len(chains) == 2:
    chains.sort(key=lambda c: not c["teacher"])
    if not chains[0]["teacher"] or chains[1]["teacher"]:
      raise ModassemError("two assemblies are compared when one is of modules incubated with a teacher (m2mKD) and "
                          "the other without: pass one assembly run, or such a pair")
  used = {_key(r["dir"]) for c in chains for r in [c["meta"], c["assemble"], *c["incubate"]]} | {
      _key(r["dir"]) for r in e2e} | {_key(m) for c in chains for m in c["metas"]}
  stray = [r["dir"] for k, r in given.items() if k not in used]
  if stray:
    raise ModassemError(f"{stray[0]} is not part of the reported assembly's chain (its meta and incubation runs) nor "
                        "an e2e run: leave it out, or pass the assembly made from it")
  results, dirs = {}, {}
  for chain, (inc, asm) in zip(chains, [("incubate", "assemble"), PLAIN]):
    results.update({"meta": chain["meta"]["results"], inc: _combined(chain["incubate"]),
                    asm: chain["assemble"]["results"]})
    dirs.update({"meta": chain["meta"]["dir"], inc: [i["dir"] for i in chain["incubate"]],
                 asm: chain["assemble"]["dir"]})
  if len(chains[0]["metas"]) > 1:
    dirs["meta_runs"] = chains[0]["metas"]   # stacked with allow_mixed_meta
  if e2e:
    results["e2e"], dirs["e2e"] = e2e[0]["results"], e2e[0]["dir"]
  return results, dirs, chains[0]["teacher"] or None


def write(run_dirs: list[str], out: str) -> dict:
  """report.json, report.md and curves.png of `run_dirs` in `out`; returns the report."""
  results, dirs, teacher = collect(run_dirs)
  report = make_report(results, dirs, teacher)
  outp = files.path(out)
  outp.mkdir(parents=True, exist_ok=True)
  files.write_json(outp / "report.json", report)
  files.write_text(outp / "report.md", report_markdown(report))
  plot_curves(dirs, outp / "curves.png")
  return report


def common_parent(run_dirs: list[str]) -> str:
  """Where a report of `run_dirs` goes by default: the folder that holds them all."""
  if all(files.is_remote(d) for d in run_dirs):
    return os.path.dirname(os.path.commonprefix([d.rstrip("/") + "/" for d in run_dirs]).rstrip("/")) or run_dirs[0]
  return os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in run_dirs])


def _teacher_summary(teacher: str) -> dict:
  """The teacher's own numbers, from its run's results.json (none for an official .pth)."""
  done = {} if teacher.endswith(".pth") else (files.read_json(files.path(teacher) / RESULTS_FILE) or {})
  return {"source": teacher, "top1": done.get("top1"), "top5": done.get("top5"), "train_flops": done.get("train_flops")}


def make_report(results: dict, dirs: dict, teacher: str | None = None) -> dict:
  phases = {p: {k: results[p].get(k) for k in ("top1", "top5", "loss", "steps", "train_flops", "wall_s")}
            for p in results}
  for p in phases:
    phases[p]["workdir"] = ",".join(dirs[p]) if isinstance(dirs[p], list) else dirs[p]
  phases["assemble"]["top1_before_fine_tuning"] = _first_eval(dirs["assemble"]).get("top1")
  method_flops = sum(phases[p]["train_flops"] for p in METHOD)
  method_wall = sum(phases[p]["wall_s"] for p in METHOD)
  # A meta run outside the folder of the assembly it fed was trained once for several chains (`modassem pipeline
  # --config.meta=RUN`); its FLOPs are in each chain's budget all the same.
  shared = _parent(dirs["meta"]) != _parent(dirs["assemble"])
  report = {
      "phases": phases,
      "meta_shared": shared,
      "meta_runs": list(dirs.get("meta_runs") or [phases["meta"]["workdir"]]),
      "incubated_modules": {k: v for k, v in results["incubate"].items() if k.startswith("module_")},
      "assembled": {"top1": phases["assemble"]["top1"], "top5": phases["assemble"]["top5"],
                    "train_flops": method_flops, "wall_s": method_wall},
  }
  if "e2e" in phases:
    report["e2e"] = {"top1": phases["e2e"]["top1"], "top5": phases["e2e"]["top5"],
                     "train_flops": phases["e2e"]["train_flops"], "wall_s": phases["e2e"]["wall_s"]}
    report["top1_gain"] = phases["assemble"]["top1"] - phases["e2e"]["top1"]
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
  lines = ["# modassem report", "",
           "| phase | top-1 % | top-5 % | eval loss | steps | train FLOPs | wall s |",
           "|---|---|---|---|---|---|---|"]
  for p, v in r["phases"].items():
    lines.append(f"| {p} | {v['top1']:.2f} | {v['top5']:.2f} | {v['loss']:.4f} | {v['steps']} | "
                 f"{v['train_flops']:.3g} | {v['wall_s']:.0f} |")
  a, e = r["assembled"], r.get("e2e")
  lines += ["", "| model | top-1 % | top-5 % | train FLOPs (all phases) | wall s |", "|---|---|---|---|---|",
            f"| assembled (meta + incubate + assemble) | {a['top1']:.2f} | {a['top5']:.2f} | {a['train_flops']:.3g} | "
            f"{a['wall_s']:.0f} |"]
  if e:
    lines += [f"| end-to-end | {e['top1']:.2f} | {e['top5']:.2f} | {e['train_flops']:.3g} | {e['wall_s']:.0f} |",
              "", f"Assembled minus end-to-end: {r['top1_gain']:+.2f} top-1 points on the held-out split."]
    share = e["train_flops"] / a["train_flops"] if a["train_flops"] else float("nan")
    if not 0.99 <= share <= 1.01:
      lines.append(f"The end-to-end run trained with {100 * share:.0f} % of the method's FLOPs, so this is not an "
                   "equal-FLOPs comparison (`modassem pipeline` gives e2e the method's FLOPs).")
  else:
    lines += ["", "No end-to-end run given: pass one to compare with."]
  if len(r.get("meta_runs", [])) > 1:
    lines.append(f"The modules grew in {len(r['meta_runs'])} meta runs ({', '.join(r['meta_runs'])}), stacked with "
                 "allow_mixed_meta; the method's FLOPs count the first one's training.")
  if r.get("meta_shared"):
    lines.append(f"The meta run {r['phases']['meta']['workdir']} was shared: trained once, outside this chain's "
                 "folder, and its training FLOPs counted in the method's budget as if it had been trained here.")
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


def _parent(run_dir: str) -> str:
  return os.path.dirname(_key(run_dir).rstrip("/"))


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
    # Several incubation runs (one per module) are chained one after another, as their FLOPs add up.
    chained = [(p, d) for p in phases if p in dirs for d in (dirs[p] if isinstance(dirs[p], list) else [dirs[p]])]
    for p, d in chained:
      recs = _records(d)
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
