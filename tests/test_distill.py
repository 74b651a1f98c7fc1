"""m2mKD: incubation against a trained teacher's modules, in the same frozen meta model.

The loss against a NumPy computation of its formula; a run with a teacher (the session pipeline's assembled model)
that trains the student module alone, leaves the teacher and the meta model as they were, logs both terms, and
ends elsewhere than plain incubation; an official .pth teacher; students deeper than their teacher and wider than
the meta model (stitch layers), `module=all` against single-module runs, and their assembly; the pipeline's report
and `modassem plan`; bad teachers."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import stepping
from conftest import TINY, tiny
from modassem import checkpoints, files, records, steps, train
from modassem import report as report_lib
from modassem.errors import ModassemError
from test_errors import assert_names, train_error


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha, tau", [(0.5, 1.0), (0.3, 2.0), (1.0, 0.5), (0.0, 3.0)])
def test_the_loss_is_the_formula(alpha, tau):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
  targets = rng.dirichlet(np.ones(5), size=6).astype(np.float32)   # mixed, smoothed targets
  ce = -(targets * _log_softmax(student)).sum(-1).mean()
  log_pt, log_ps = _log_softmax(teacher / tau), _log_softmax(student / tau)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum() / student.size * tau ** 2
  total, got_ce, got_kl = steps.distill_loss(student, teacher, targets, alpha=alpha, tau=tau)
  np.testing.assert_allclose([got_ce, got_kl], [ce, kl], rtol=2e-6)
  np.testing.assert_allclose(total, (1 - alpha) * ce + alpha * kl, rtol=2e-6)


def _arrays(path):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(ocp.StandardCheckpointer().restore(path))]


def _modules(run_dir):
  return {k: _arrays(checkpoints.module_dir(run_dir, k)) for k in range(4)
          if checkpoints.module_dir(run_dir, k).exists()}


@pytest.fixture(scope="module")
def teacher(pipeline_dir):
  return os.path.join(pipeline_dir, "assemble")


def test_an_incubation_learns_from_the_teacher_and_touches_nothing_else(runs, teacher, tmp_path):
  work = str(tmp_path / "m2mkd")
  before = {d: _modules(d) for d in (teacher, runs["meta"])}
  config = tiny("incubate", meta=runs["meta"], module="1", teacher=teacher, log_every_steps=1,
                **{"distill.alpha": 0.4, "distill.tau": 2.0})
  train.train(config, work)
  # The teacher's and the meta model's modules are as they were; the run saved the student alone.
  for d, mods in before.items():
    after = _modules(d)
    for k in mods:
      for a, b in zip(after[k], mods[k], strict=True):
        np.testing.assert_array_equal(a, b)
  assert sorted(_modules(work)) == [1]
  # The train state holds the student and its optimizer state, nothing of the teacher or the meta model.
  state = ocp.StandardCheckpointer().metadata(checkpoints.state_dir(work) / "6" / "state").item_metadata.tree
  assert set(state["params"]) == {"module_1"} and set(state["opt_state"]) == {"module_1"}
  run = files.read_json(os.path.join(work, "run.json"))
  assert run["teacher"] == {"run": teacher, "depths": [2, 2, 2, 2]} and run["trained"] == [1]
  # Both terms are logged, and the loss is their mix.
  with open(os.path.join(work, "metrics.jsonl")) as f:
    records = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    np.testing.assert_allclose(r["loss"], 0.6 * r["module_1/ce"] + 0.4 * r["module_1/kl"], rtol=1e-5)
    assert r["module_1/kl"] > 0
  # The teacher changed what the student learnt; with alpha=0 it is there and changes nothing: the student ends
  # where plain incubation ends, bit for bit.
  plain = _modules(runs["inc_1"])[1]
  assert any(not np.array_equal(a, b) for a, b in zip(_modules(work)[1], plain, strict=True))
  ignored = str(tmp_path / "alpha0")
  train.train(tiny("incubate", meta=runs["meta"], module="1", teacher=teacher, **{"distill.alpha": 0.0}), ignored)
  for a, b in zip(_modules(ignored)[1], plain, strict=True):
    np.testing.assert_array_equal(a, b)


def _fake_run(folder, **changes):
  """A run directory whose run.json is the tiny pipeline's assembly's with `changes` (no modules needed: the checks
  read run.json first)."""
  os.makedirs(folder)
  run = {"phase": "assemble", "preset": "tiny", "arch": records.arch_of(tiny("assemble")),
         "depths": [2, 2, 2, 2], "trained": [0, 1, 2, 3], "total_steps": 6}
  run.update(changes)
  files.write_json(os.path.join(folder, "run.json"), run)
  return folder


def test_a_teacher_that_does_not_fit_is_a_one_line_error(capsys, tmp_path, runs):
  inc = [f"--config.meta={runs['meta']}", "--config.module=1"]
  three = _fake_run(str(tmp_path / "three"), depths=[3, 3, 2])
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", *inc, f"--config.teacher={three}", sources=[runs["meta"]])
  assert_names(line, f"teacher {three!r} is cut into 3 modules [3, 3, 2], this model into 4", "num_modules=4")
  wide = _fake_run(str(tmp_path / "wide"), arch={**records.arch_of(tiny("assemble")), "width": 64})
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", *inc, f"--config.teacher={wide}")
  assert_names(line, f"teacher {wide!r}", "another architecture", "width 64 vs 16")
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", *inc, f"--config.teacher={tmp_path}")
  assert_names(line, "is not a run directory (no run.json)")
  line = train_error(capsys, tmp_path, f"{TINY}:meta", f"--config.teacher={three}")
  assert_names(line, "a teacher only applies to incubation (this is a meta run)")
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", *inc, f"--config.teacher={three}",
                     "--config.distill.alpha=1.5")
  assert_names(line, "distill.alpha=1.5 is out of range")


def test_an_official_pth_teacher_is_imported_on_the_fly(runs, tmp_path):
  """The same teacher as an official-layout .pth file (written by a PyTorch ViT of the official key layout) and as
  the run `modassem convert` makes of it: the same student after the same steps."""
  from test_convert import TorchViT, save_official  # pylint: disable=g-import-not-at-top  (torch)
  from modassem import cli  # pylint: disable=g-import-not-at-top
  pth = save_official(tmp_path / "teacher.pth", TorchViT(8).eval(), (2, 2, 2, 2))
  imported = str(tmp_path / "teacher_run")
  assert cli.main(["convert", f"--from={pth}", f"--to={imported}"]) == 0
  students = []
  for teacher in (pth, imported):
    _, state, history = stepping.run_steps(tiny("incubate", meta=runs["meta"], module="2", teacher=teacher), 2)
    assert float(history[-1]["module_2/kl"]) > 0
    students.append(stepping.leaves(state.params))
  assert students[0].keys() == students[1].keys()
  for name in students[0]:
    np.testing.assert_array_equal(students[0][name], students[1][name])


def test_the_pipeline_gives_the_teacher_to_the_incubation_alone_and_reports_it(pipeline_dir, teacher, tmp_path):
  from modassem import pipeline  # pylint: disable=g-import-not-at-top
  configs, _ = pipeline.phase_configs(TINY, {"teacher": teacher, "distill.alpha": 0.3}, str(tmp_path))
  assert (configs["incubate"].teacher, configs["incubate"].distill.alpha) == (teacher, 0.3)
  for phase in ("meta", "assemble", "e2e"):
    assert (configs[phase].teacher, configs[phase].distill.alpha) == ("", 0.5)
  dirs = {p: os.path.join(pipeline_dir, p) for p in ("meta", "incubate", "assemble", "e2e")}
  results = {p: files.read_json(os.path.join(d, "results.json")) for p, d in dirs.items()}
  report = report_lib.make_report(results, dirs, teacher=teacher)
  own = files.read_json(os.path.join(teacher, "results.json"))
  assert report["teacher"] == {"source": teacher, "top1": own["top1"], "top5": own["top5"],
                               "train_flops": own["train_flops"]}
  assert f"Incubated against the teacher {teacher} (m2mKD): {own['top1']:.2f} % top-1" in \
      report_lib.report_markdown(report)
  assert "teacher" not in report_lib.make_report(results, dirs)


def test_a_plan_prices_the_teacher_forward_pass(runs):
  from modassem import cost  # pylint: disable=g-import-not-at-top
  assert cost.phase_config(TINY, "meta", {"teacher": "t"}).teacher == ""
  assert cost.phase_config(TINY, "incubate1", {"teacher": "t"}).teacher == "t"

  def flops(**overrides):
    return cost.phase_step_flops(cost.phase_config(TINY, "incubate0", overrides), 6, 2)

  plain = flops()
  same_size = flops(teacher="a teacher not trained yet")          # priced with the target's own cut
  shallow = flops(teacher=runs["meta"])                           # its run says: one block per module
  # The teacher hybrid adds one forward pass to a step of fewer than three (the frozen meta modules after the
  # student get no weight gradients): about half as much again.
  assert 1.3 < same_size / plain < 1.7, same_size / plain
  assert plain < shallow < same_size


def test_students_deeper_than_their_teacher_and_wider_than_the_meta_model(runs, tmp_path, capsys):
  """The meta run (width 16, one block per module) as meta model and teacher; students of width 32 with two blocks
  per module, the second one sparse (4 experts, top 2, as m2mKD's V-MoE students are): a dense teacher cut into
  other depths than the students'. A meta run of another width is an error unless stitching is asked for; then
  each student module gets stitch layers at its entry and exit (none before the stem, none after the head),
  trained with it and kept out of modules/. `module=all` ends where a single-module run ends (slot 2: a meta prefix
  of two blocks, both stitch layers, a meta block after it), and the students assemble into a width-32 model with
  no stitch in it."""
  wide = {"model.width": 32, "model.heads": 4, "model.moe.experts": 4, "model.moe.every": 2}
  line = train_error(capsys, tmp_path, f"{TINY}:incubate", f"--config.meta={runs['meta']}", "--config.model.width=32",
                     "--config.model.heads=4")
  assert_names(line, "width 16 vs 32", "or set --config.stitch=True")

  inc, asm = str(tmp_path / "inc"), str(tmp_path / "asm")
  common = {"meta": runs["meta"], "teacher": runs["meta"], "total_steps": 3, "stitch": True, **wide}
  trained = train.train(tiny("incubate", module="all", **common), inc)
  # `modassem plan` prices the step the run trained: stitch layers and a meta model of width 16 included.
  from modassem import cost  # pylint: disable=g-import-not-at-top
  assert cost.phase_step_flops(tiny("incubate", module="all", **common), 3, 2) == trained["step_flops"]
  run = files.read_json(os.path.join(inc, "run.json"))
  assert run["teacher"]["depths"] == [1, 1, 1, 1]
  assert run["stitches"]["meta"] == {"width": 16, "heads": 2, "mlp_ratio": 4.0}
  state = ocp.StandardCheckpointer().metadata(checkpoints.state_dir(inc) / "3" / "state").item_metadata.tree
  params = state["params"]
  assert sorted(params) == [f"{kind}_{k}" for kind in ("module", "stitch") for k in range(4)]
  assert sorted(params["stitch_0"]) == ["exit"] and sorted(params["stitch_3"]) == ["entry"]
  assert sorted(params["stitch_1"]) == ["entry", "exit"]
  assert params["stitch_1"]["entry"]["proj"]["kernel"].shape == (16, 32)
  assert params["stitch_1"]["exit"]["proj"]["kernel"].shape == (32, 16)
  assert set(state["opt_state"]) == {f"module_{k}" for k in range(4)}
  assert sorted(p.name for p in (files.path(inc) / "modules").iterdir()) == [f"module_{k}" for k in range(4)]

  saved = ocp.StandardCheckpointer().restore(checkpoints.state_dir(inc) / "3" / "state")["params"]
  for k in (2,):
    _, alone, _ = stepping.run_steps(tiny("incubate", module=str(k), **common), 3)
    for name in (f"module_{k}", f"stitch_{k}"):
      got, want = stepping.leaves(saved[name]), stepping.leaves(alone.params[name])
      assert got.keys() == want.keys()
      for leaf in want:
        np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, atol=1e-6, err_msg=f"{name}{leaf}")

  result = train.train(tiny("assemble", modules=",".join([inc] * 4), total_steps=2, **wide), asm)
  assert np.isfinite(result["loss"])
  assembled = stepping.leaves(ocp.StandardCheckpointer().restore(checkpoints.module_dir(asm, 1)))
  assert not any("stitch" in name for name in assembled)
  assert {name.split("]")[0] for name in assembled} == {"['blocks_0'", "['blocks_1'"}
  assert assembled["['blocks_0']['attn']['qkv']['kernel']"].shape == (32, 96)
  assert assembled["['blocks_1']['mlp']['fc1_kernel']"].shape == (4, 32, 128)
  assert "['blocks_0']['mlp']['fc1']['kernel']" in assembled
  # A stitched hybrid has no official layout: loading or exporting one says so and points at the assembly.
  import modassem  # pylint: disable=g-import-not-at-top
  with pytest.raises(ModassemError, match="stitch layers that no official layout holds"):
    modassem.load(inc, module=1)


def test_compare_plain_adds_plain_incubation_and_its_assembly_to_the_report(pipeline_dir, teacher, tmp_path,
                                                                           capsys):
  from modassem import cli, pipeline  # pylint: disable=g-import-not-at-top
  configs, dirs = pipeline.phase_configs(TINY, {"teacher": teacher}, str(tmp_path), compare_plain=True)
  assert configs["incubate"].teacher == teacher and configs["incubate_plain"].teacher == ""
  assert configs["assemble_plain"].modules == ",".join([dirs["incubate_plain"]] * 4)
  assert configs["assemble"].modules == ",".join([dirs["incubate"]] * 4)
  # The report, from the session pipeline's runs for the m2mKD chain and copies of its incubation and assembly,
  # with other scores and FLOPs, for the plain one: each column must come from its own chain.
  runs = {p: os.path.join(pipeline_dir, p) for p in ("meta", "incubate", "assemble", "e2e")}
  for p in ("incubate", "assemble"):
    runs[f"{p}_plain"] = str(tmp_path / f"{p}_plain")
    shutil.copytree(runs[p], runs[f"{p}_plain"])
    res = files.read_json(os.path.join(runs[p], "results.json"))
    files.write_json(os.path.join(runs[f"{p}_plain"], "results.json"),
                     {**res, "top1": 12.5, "module_2/top1": 13.5, "train_flops": res["train_flops"] / 2})
  metrics = os.path.join(runs["assemble_plain"], "metrics.jsonl")
  with open(metrics) as f:
    records = [json.loads(line) for line in f]
  (before,) = [r for r in records if r["kind"] == "eval" and r["step"] == 0]   # the stacked modules' score
  before["top1"] = 9.75
  with open(metrics, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  results = {p: files.read_json(os.path.join(d, "results.json")) for p, d in runs.items()}
  report = report_lib.make_report(results, runs, teacher=teacher)
  assert (report["plain"]["top1"], report["plain"]["top1_before_fine_tuning"]) == (12.5, 9.75)
  assert report["plain"]["incubated_modules"]["module_2/top1"] == 13.5
  assert report["assembled"]["top1"] == results["assemble"]["top1"] != 12.5
  assert report["incubated_modules"]["module_2/top1"] == results["incubate"]["module_2/top1"] != 13.5
  full = [results[p]["train_flops"] for p in ("meta", "incubate", "assemble")]
  assert report["assembled"]["train_flops"] == pytest.approx(sum(full))
  assert report["plain"]["train_flops"] == pytest.approx(full[0] + full[1] / 2 + full[2] / 2)
  text = report_lib.report_markdown(report)
  assert "| plain | 9.75 | 12.50 |" in text
  assert "| with the teacher (m2mKD) |" in text
  # Without a teacher there is nothing to compare: a one-line error before anything runs.
  capsys.readouterr()
  assert cli.main(["pipeline", f"--config={TINY}", f"--workdir={tmp_path / 'p'}", "--compare_plain"]) == 2
  assert "--compare_plain compares incubation with a teacher" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "p")
