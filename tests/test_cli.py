"""The CLI end to end on the tiny preset: pipeline outputs (the session's `pipeline_dir`), result files, and eval
of a finished run."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import TINY, tiny
from modassem import cli


def test_pipeline_writes_every_run_and_the_report(pipeline_dir):
  """Every run's results and files; the step FLOPs each run recorded are what `modassem plan` prices for its config;
  e2e's steps are the method's FLOPs over e2e's step; the report's numbers are the runs' own; and the stacked
  modules' top-1 before fine-tuning is what the incubated modules, stacked here by hand, score on the held-out
  split."""
  from modassem import cost, data as data_lib  # pylint: disable=g-import-not-at-top
  import modassem  # pylint: disable=g-import-not-at-top
  res = {}
  for phase in ("meta", "incubate", "assemble", "e2e"):
    with open(os.path.join(pipeline_dir, phase, "results.json")) as f:
      res[phase] = json.load(f)
    assert res[phase]["phase"] == phase
    with open(os.path.join(pipeline_dir, phase, "metrics.jsonl")) as f:
      kinds = [json.loads(line)["kind"] for line in f]
    assert "train" in kinds and kinds[-1] == "final"
    assert os.listdir(os.path.join(pipeline_dir, phase, "tb"))
    planned = tiny(phase, **({"meta": os.path.join(pipeline_dir, "meta")} if phase == "incubate" else {}))
    assert res[phase]["step_flops"] == cost.phase_step_flops(planned, 6, 2), phase
  assert [res[p]["steps"] for p in ("meta", "incubate", "assemble")] == [6, 6, 6]
  method = 6 * (res["meta"]["step_flops"] + res["incubate"]["step_flops"] + res["assemble"]["step_flops"])
  assert res["e2e"]["steps"] == round(method / res["e2e"]["step_flops"])
  with open(os.path.join(pipeline_dir, "report.json")) as f:
    report = json.load(f)
  assert report["assembled"]["top1"] == res["assemble"]["top1"] and report["e2e"]["top1"] == res["e2e"]["top1"]
  assert report["top1_gain"] == res["assemble"]["top1"] - res["e2e"]["top1"]
  assert report["assembled"]["train_flops"] == sum(res[p]["train_flops"] for p in ("meta", "incubate", "assemble"))
  # Before fine-tuning: module k of the module=all incubation run in slot k, evaluated here.
  inc = os.path.join(pipeline_dir, "incubate")
  model, _ = modassem.load(os.path.join(pipeline_dir, "assemble"))
  stacked = {f"module_{k}": modassem.load(inc, module=k)[1][f"module_{k}"] for k in range(4)}
  c = tiny("assemble")
  correct = loss = count = 0.0
  for b in data_lib.build(c.data, c.model.image_size).eval_batches(c.eval_batch_size):
    logits = np.asarray(model.apply({"params": stacked}, b["image"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(logits)), b["label"]]   # cross-entropy, by hand
    correct += float(((logits.argmax(-1) == b["label"]) * b["mask"]).sum())
    loss, count = loss + float((nll * b["mask"]).sum()), count + float(b["mask"].sum())
  assert report["phases"]["assemble"]["top1_before_fine_tuning"] == pytest.approx(100 * correct / count, abs=1e-6)
  with open(os.path.join(pipeline_dir, "assemble", "metrics.jsonl")) as f:
    first = next(r for r in map(json.loads, f) if r["kind"] == "eval" and r["step"] == 0)
  assert first["loss"] == pytest.approx(loss / count, rel=1e-5)   # top-1 near chance says little; the loss does
  with open(os.path.join(pipeline_dir, "report.md")) as f:
    md = f.read()
  assert f"| assembled (meta + incubate + assemble) | {res['assemble']['top1']:.2f} |" in md
  assert f"| end-to-end | {res['e2e']['top1']:.2f} |" in md
  with open(os.path.join(pipeline_dir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_incubation_costs_less_per_module_than_the_whole(pipeline_dir):
  """The `all` step (four hybrids) costs less than four times an e2e step of the target."""
  res = {}
  for phase in ("meta", "incubate", "e2e"):
    with open(os.path.join(pipeline_dir, phase, "results.json")) as f:
      res[phase] = json.load(f)["step_flops"]
  assert res["meta"] < res["e2e"] < res["incubate"] < 4 * res["e2e"]


def test_eval_of_a_finished_run_reproduces_its_result(pipeline_dir, capsys):
  # An assembled run evaluates from its own checkpoint: the module sources are not needed.
  run = os.path.join(pipeline_dir, "assemble")
  capsys.readouterr()
  assert cli.main(["eval", f"--config={TINY}:assemble", f"--workdir={run}"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with open(os.path.join(run, "results.json")) as f:
    final = json.load(f)
  assert printed["step"] == final["steps"] == tiny("assemble").total_steps
  assert printed["top1"] == pytest.approx(final["top1"])
  assert printed["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_rerunning_the_pipeline_finds_every_run_finished(pipeline_dir, capsys):
  capsys.readouterr()
  assert cli.main(["pipeline", f"--config={TINY}", f"--workdir={pipeline_dir}"]) == 0
  out = capsys.readouterr().out
  assert out.count("already finished") == 4


@pytest.mark.parametrize("verb, flag", [("train", "--workdir"), ("eval", "--workdir"), ("pipeline", "--config"),
                                        ("convert", "--from"), ("plan", "--num_train")])
def test_every_verb_explains_itself(verb, flag, capsys):
  assert cli.main([verb, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"modassem {verb}: ") and f"  {flag}: " in out


def test_load_picks_one_hybrid_from_a_run_that_incubated_every_module(pipeline_dir):
  """`modassem.load(run, module=2)` of a module=all run: module 2 as incubated, the meta run's modules around it."""
  import modassem  # pylint: disable=g-import-not-at-top
  from modassem.errors import ModassemError  # pylint: disable=g-import-not-at-top
  inc, meta = os.path.join(pipeline_dir, "incubate"), os.path.join(pipeline_dir, "meta")
  with pytest.raises(ModassemError, match="module=i"):
    modassem.load(inc)
  model, params = modassem.load(inc, module=2)
  _, meta_params = modassem.load(meta)
  _, assembled = modassem.load(os.path.join(pipeline_dir, "assemble"))
  with open(os.path.join(inc, "run.json")) as f:
    depths = json.load(f)["depths"]
  assert model.depths == (1, 1, depths[2], 1)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for k in (0, 1, 3):
    assert same(params[f"module_{k}"], meta_params[f"module_{k}"]), k
  # Module 2 is the incubated one: the hybrid scores on the held-out split what the run's own evaluation gave it.
  from modassem import data as data_lib  # pylint: disable=g-import-not-at-top
  c = tiny("incubate")
  correct = count = 0.0
  for b in data_lib.build(c.data, c.model.image_size).eval_batches(c.eval_batch_size):
    hit = np.asarray(model.apply({"params": params}, b["image"])).argmax(-1) == b["label"]
    correct, count = correct + float((hit * b["mask"]).sum()), count + float(b["mask"].sum())
  with open(os.path.join(inc, "results.json")) as f:
    assert 100 * correct / count == pytest.approx(json.load(f)["module_2/top1"], abs=1e-6)
  assert not same(params["module_2"], assembled["module_2"])   # assembly fine-tuned it
  with pytest.raises(ModassemError, match="module=7"):
    modassem.load(inc, module=7)
  with pytest.raises(ModassemError, match="a meta run"):
    modassem.load(meta, module=1)


def test_runs_started_with_relative_paths_are_read_from_anywhere(runs, monkeypatch, tmp_path):
  """An incubation started from one folder with relative --config.meta and --workdir records its meta run
  absolute: `modassem.load` from another folder finds the meta modules of its hybrid, and config.json names the
  meta run wherever it is read."""
  import modassem  # pylint: disable=g-import-not-at-top
  meta = runs["meta"]
  monkeypatch.chdir(os.path.dirname(meta))
  assert cli.main(["train", f"--config={TINY}:incubate", f"--config.meta={os.path.basename(meta)}",
                   "--config.module=1", "--workdir=relative_inc"]) == 0
  inc = os.path.join(os.path.dirname(meta), "relative_inc")
  monkeypatch.chdir(tmp_path)
  with open(os.path.join(inc, "config.json")) as f:
    assert json.load(f)["meta"] == meta
  with open(os.path.join(inc, "run.json")) as f:
    assert json.load(f)["sources"] == [meta]
  _, params = modassem.load(inc)
  _, theirs = modassem.load(runs["inc_1"])   # the same incubation, started with absolute paths
  for k in range(4):
    for a, b in zip(jax.tree.leaves(params[f"module_{k}"]), jax.tree.leaves(theirs[f"module_{k}"]), strict=True):
      np.testing.assert_array_equal(a, b)


def test_training_and_evaluation_log_a_modules_metrics_under_one_key(pipeline_dir):
  """An incubation of every module logs each module's loss as `module_k/loss` in its train and eval records alike."""
  with open(os.path.join(pipeline_dir, "incubate", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_keys = set().union(*(r for r in records if r["kind"] == "train"))
  eval_keys = set().union(*(r for r in records if r["kind"] in ("eval", "final")))
  for k in range(4):
    assert f"module_{k}/loss" in train_keys and f"module_{k}/loss" in eval_keys, k
  assert not [key for key in train_keys | eval_keys if key.startswith(("loss/", "ce/", "kl/", "grad_norm/"))]
