"""`modassem plan` on the tiny preset: the table's structure and arithmetic, the step counts and the errors."""

import contextlib
import io
import json
import os
import re

import pytest

from conftest import TINY
from modassem import cli, cost as plan

PHASES = ["meta", "incubate0", "incubate1", "incubate2", "incubate3", "assemble", "e2e"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  """The JSON and the printed report of one run of `modassem plan` on the tiny preset."""
  out = str(tmp_path_factory.mktemp("plan") / "tiny.json")
  text = io.StringIO()
  # total_steps=0: steps come from epochs and the digits train-set size, as for a real preset.
  with contextlib.redirect_stdout(text):
    assert cli.main(["plan", f"--config={TINY}", "--config.total_steps=0", f"--out={out}"]) == 0
  with open(out) as f:
    return json.load(f), text.getvalue()


def _table(text: str) -> dict:
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] in PHASES:
      rows[cells[0]] = cells
  return rows


def test_table_lists_every_phase_with_its_numbers(planned):
  report, text = planned
  rows = _table(text)
  assert list(rows) == PHASES
  for name, (_, per_step, steps, total, share) in rows.items():
    assert float(total) == pytest.approx(float(per_step) * int(steps), rel=2e-3)
    assert (share == "-") == (name == "e2e")
  assert list(report["phases"]) == PHASES


def test_a_plan_prices_each_step_as_the_runs_recorded_it(planned, pipeline_dir):
  """The step FLOPs of meta, assembly and e2e are those the session pipeline's runs recorded (the plan's schedule
  is longer, which changes no operation of the step), and each phase's total and share follow from them."""
  report, _ = planned
  ph = report["phases"]
  recorded = {p: json.load(open(os.path.join(pipeline_dir, p, "results.json")))["step_flops"]
              for p in ("meta", "assemble", "e2e")}
  for p, flops in recorded.items():
    assert ph[p]["step_flops"] == flops, p
  method = sum(ph[n]["step_flops"] * ph[n]["steps"] for n in PHASES[:-1])
  for n in PHASES[:-1]:
    assert ph[n]["share"] == pytest.approx(ph[n]["step_flops"] * ph[n]["steps"] / method)
  assert report["e2e_flops"] == recorded["e2e"] * ph["e2e"]["steps"]


def test_steps_follow_the_epochs(planned):
  report, _ = planned
  per_epoch = 1437 // 32
  assert report["num_train"] == 1437
  # The tiny preset keeps the paper's epochs: meta 300, incubation 100, assembly 100, e2e 300.
  expect = {"meta": 300, "incubate0": 100, "incubate3": 100, "assemble": 100, "e2e": 300}
  for name, epochs in expect.items():
    assert report["phases"][name]["steps"] == epochs * per_epoch


def test_incubation_gets_cheaper_with_the_module_index(planned):
  # Nothing before slot i is trained, so later slots run a shorter backward pass.
  flops = [planned[0]["phases"][f"incubate{i}"]["step_flops"] for i in range(4)]
  assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1]


def test_assembly_step_costs_what_the_e2e_step_does(planned):
  ph = planned[0]["phases"]
  assert ph["e2e"]["step_flops"] == pytest.approx(ph["assemble"]["step_flops"], rel=0.01)


def test_printed_ratio_is_method_over_e2e(planned):
  report, text = planned
  match = re.search(r"method / e2e: ([0-9.]+) \(FLOPs\); paper, A100 GPU-hours: -", text)
  assert match, text
  assert float(match.group(1)) == pytest.approx(report["method_flops"] / report["e2e_flops"], abs=1e-3)
  assert report["ratio"] == pytest.approx(report["method_flops"] / report["e2e_flops"])
  assert "not FLOPs" in text


def test_num_train_override_changes_steps():
  first, n, planned = plan.schedule(TINY, {"total_steps": 0}, 6400)
  assert n == 6400 and first.phase == "meta"
  assert list(planned) == PHASES
  assert planned["meta"][1] == 300 * (6400 // 32)
  assert planned["incubate1"][1] == 100 * (6400 // 32)
  assert planned["incubate1"][0].module == "1"


def test_total_steps_override_wins():
  config = plan.phase_config(TINY, "e2e", {"total_steps": 7})
  assert plan.phase_steps(config, 1437) == (7, 2)


def test_paper_ratio_for_the_published_presets():
  report = plan.summarize("vit_h14", 1, {"meta": 1.0, "incubate0": 1.0, "assemble": 1.0, "e2e": 1.0},
                          {"meta": 1, "incubate0": 1, "assemble": 1, "e2e": 3})
  assert report["ratio"] == pytest.approx(1.0)
  assert report["paper_ratio"] == pytest.approx(2720 / 4790)
  assert "2720 / 4790 = 0.57" in plan.markdown(report)


def test_unknown_dataset_is_a_one_line_error(capsys):
  assert cli.main(["plan", f"--config={TINY}", "--config.data.name=folder"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("modassem plan: error:") and "--num_train" in err and "\n" not in err


def test_unknown_config_field_is_a_one_line_error(capsys):
  assert cli.main(["plan", f"--config={TINY}", "--config.no_such=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("modassem plan: error: unknown config field 'no_such'") and "\n" not in err
