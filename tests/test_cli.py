"""The CLI end to end on the tiny preset: pipeline outputs (the session's `pipeline_dir`), result files, and eval
of a finished run."""

import json
import os

import pytest

from conftest import TINY, tiny
from modassem import cli


def test_pipeline_writes_every_run_and_the_report(pipeline_dir):
  for phase in ("meta", "incubate", "assemble", "e2e"):
    with open(os.path.join(pipeline_dir, phase, "results.json")) as f:
      res = json.load(f)
    assert res["phase"] == phase
    assert {"top1", "top5", "loss", "steps", "wall_s", "train_flops"} <= set(res)
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0
    assert res["train_flops"] == pytest.approx(res["step_flops"] * res["steps"])
    with open(os.path.join(pipeline_dir, phase, "metrics.jsonl")) as f:
      kinds = [json.loads(line)["kind"] for line in f]
    assert "train" in kinds and kinds[-1] == "final"
    assert os.listdir(os.path.join(pipeline_dir, phase, "tb"))
  with open(os.path.join(pipeline_dir, "report.json")) as f:
    report = json.load(f)
  method = sum(report["phases"][p]["train_flops"] for p in ("meta", "incubate", "assemble"))
  assert report["assembled"]["train_flops"] == pytest.approx(method)
  # The baseline gets the method's FLOPs, to within one of its own steps.
  e2e = report["phases"]["e2e"]
  assert abs(e2e["train_flops"] - method) <= e2e["train_flops"] / e2e["steps"]
  assert report["top1_gain"] == pytest.approx(report["assembled"]["top1"] - report["e2e"]["top1"])
  # The stacked modules are evaluated before fine-tuning starts.
  assert 0.0 <= report["phases"]["assemble"]["top1_before_fine_tuning"] <= 100.0
  with open(os.path.join(pipeline_dir, "report.md")) as f:
    md = f.read()
  assert "| assembled" in md and "| end-to-end" in md
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
