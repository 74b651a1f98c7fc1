"""`modassem report`: the report of any set of runs, the same as the pipeline's for the pipeline's runs."""

import json
import os

import pytest

from modassem import cli, report


def test_the_report_of_the_pipelines_runs_is_the_pipelines_report(pipeline_dir, tmp_path, capsys):
  out = tmp_path / "out"
  capsys.readouterr()
  assert cli.main(["report", os.path.join(pipeline_dir, "assemble"), os.path.join(pipeline_dir, "e2e"),
                   f"--out={out}"]) == 0
  assert "| assembled (meta + incubate + assemble) |" in capsys.readouterr().out
  # Its numbers are the runs' own, read here from each run's results.json and metrics.jsonl.
  runs = {}
  for p in ("meta", "incubate", "assemble", "e2e"):
    with open(os.path.join(pipeline_dir, p, "results.json")) as f:
      runs[p] = json.load(f)
  with open(out / "report.json") as f:
    r = json.load(f)
  for p, res in runs.items():
    assert r["phases"][p]["workdir"] == os.path.join(pipeline_dir, p)
    assert (r["phases"][p]["top1"], r["phases"][p]["train_flops"]) == (res["top1"], res["train_flops"]), p
  assert r["assembled"]["top1"] == runs["assemble"]["top1"] and r["e2e"]["top1"] == runs["e2e"]["top1"]
  assert r["assembled"]["train_flops"] == (runs["meta"]["train_flops"] + runs["incubate"]["train_flops"]
                                           + runs["assemble"]["train_flops"])
  assert r["incubated_modules"]["module_2/top1"] == runs["incubate"]["module_2/top1"]
  with open(os.path.join(pipeline_dir, "assemble", "metrics.jsonl")) as f:
    first_eval = next(rec for rec in map(json.loads, f) if rec["kind"] == "eval")
  assert first_eval["step"] == 0 and r["phases"]["assemble"]["top1_before_fine_tuning"] == first_eval["top1"]
  for name in ("report.json", "report.md"):
    with open(out / name) as mine, open(os.path.join(pipeline_dir, name)) as theirs:
      assert mine.read() == theirs.read(), name
  with open(out / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def write_run(root, name, phase, results, config=None, trained=(0, 1, 2, 3)):
  d = root / name
  os.makedirs(d)
  (d / "run.json").write_text(json.dumps({"phase": phase, "trained": list(trained), "depths": [2, 2, 2, 2]}))
  (d / "results.json").write_text(json.dumps({"phase": phase, "steps": 10, "wall_s": 5.0, "loss": 1.0,
                                              "step_flops": 1e9, **results}))
  (d / "config.json").write_text(json.dumps(config or {}))
  final = {"step": 10, "kind": "final", "step_flops": 1e9, "top1": results["top1"]}
  (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "kind": "eval", "top1": 11.0}) + "\n"
                                   + json.dumps({"step": 10, "kind": "train", "loss": 1.5}) + "\n"
                                   + json.dumps(final) + "\n")
  return str(d)


@pytest.fixture
def hand_run(tmp_path, monkeypatch):
  """The phases run one by one as the README shows, with relative paths: meta, one incubation run per module,
  assembly from those four, e2e."""
  monkeypatch.chdir(tmp_path)
  root = tmp_path / "runs" / "demo"
  write_demo(root, "runs/demo/")
  return root


def write_demo(root, recorded: str) -> None:
  """The demo's runs in `root`, each incubation recording its meta run, and the assembly its modules, as
  `recorded` + the run's name."""
  write_run(root, "meta", "meta", {"top1": 30.0, "top5": 70.0, "train_flops": 3e10})
  for k in range(4):
    write_run(root, f"inc{k}", "incubate", {"top1": 40.0 + k, "top5": 80.0, "train_flops": 1e10,
                                            f"module_{k}/top1": 40.0 + k, f"module_{k}/top5": 80.0 + k,
                                            f"module_{k}/loss": 1.0 + k},
              {"meta": f"{recorded}meta", "teacher": ""}, trained=(k,))
  write_run(root, "asm", "assemble", {"top1": 60.0, "top5": 90.0, "train_flops": 2e10},
            {"modules": ",".join(f"{recorded}inc{k}" for k in range(4))})
  write_run(root, "e2e", "e2e", {"top1": 55.0, "top5": 88.0, "train_flops": 9e10})


def test_a_hand_run_demo_with_one_incubation_run_per_module(hand_run, capsys):
  capsys.readouterr()
  assert cli.main(["report", "runs/demo/asm", "runs/demo/e2e"]) == 0     # into runs/demo, where the runs are
  with open(hand_run / "report.json") as f:
    r = json.load(f)
  inc = r["phases"]["incubate"]
  assert inc["train_flops"] == 4e10 and inc["wall_s"] == 20.0 and inc["steps"] == 40
  assert inc["top1"] == pytest.approx(41.5) and inc["top5"] == pytest.approx(81.5)
  # Recorded relative by an older modassem, from where its commands ran: found from there, and named absolute.
  assert inc["workdir"] == ",".join(str(hand_run / f"inc{k}") for k in range(4))
  assert r["incubated_modules"]["module_3/top1"] == 43.0
  assert r["assembled"]["train_flops"] == pytest.approx(9e10)
  assert r["top1_gain"] == pytest.approx(5.0)
  assert r["phases"]["assemble"]["top1_before_fine_tuning"] == 11.0
  assert (hand_run / "curves.png").is_file() and (hand_run / "report.md").is_file()
  # Naming the meta and incubation runs as well changes nothing.
  again = report.make_report(*report.collect([str(hand_run / n) for n in ("meta", "inc2", "asm", "e2e")]))
  assert again["phases"]["incubate"]["top1"] == inc["top1"]


@pytest.mark.parametrize("args, needle", [
    ([], "no runs given"),
    (["runs/demo/e2e"], "0 assembly runs given"),
    (["runs/demo/asm", "runs/demo/nothing"], "runs/demo/nothing does not exist"),
    (["runs/demo/asm", "runs/demo/e2e", "runs/demo/e2e_b"], "2 e2e runs given"),
    (["runs/demo/asm", "runs/demo/other"], "runs/demo/other is not part of the reported assembly's chain"),
    (["runs/demo/asm", "runs/demo/unfinished"], "has not finished"),
])
def test_what_cannot_be_reported_is_one_line(hand_run, capsys, args, needle):
  write_run(hand_run, "e2e_b", "e2e", {"top1": 1.0, "top5": 2.0, "train_flops": 1.0})
  write_run(hand_run, "other", "meta", {"top1": 1.0, "top5": 2.0, "train_flops": 1.0})
  os.remove(write_run(hand_run, "unfinished", "e2e", {"top1": 1.0, "top5": 2.0, "train_flops": 1.0})
            + "/results.json")
  capsys.readouterr()
  assert cli.main(["report", *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("modassem report: error: ") and needle in err[0], err
  assert not (hand_run / "report.json").exists()


def test_runs_recorded_relative_to_the_run_that_names_them_are_found_from_anywhere(tmp_path, monkeypatch):
  """An incubation that recorded its meta run as `../meta`, an assembly its modules as `../incK`: read beside the
  run that recorded them, from a working directory where those paths lead nowhere; the meta run is not given."""
  root = tmp_path / "runs" / "demo"
  write_demo(root, "../")
  elsewhere = tmp_path / "elsewhere" / "deeper"
  (elsewhere / ".." / "meta").mkdir(parents=True)   # where `../meta` leads from here: not a run
  monkeypatch.chdir(elsewhere)
  r = report.make_report(*report.collect([str(root / "asm"), str(root / "e2e")]))
  assert r["phases"]["incubate"]["workdir"] == ",".join(str(root / f"inc{k}") for k in range(4))
  assert r["phases"]["meta"]["workdir"] == str(root / "meta") and r["phases"]["meta"]["top1"] == 30.0
  assert r["assembled"]["train_flops"] == pytest.approx(3e10 + 4e10 + 2e10)


def test_a_run_named_by_another_is_matched_by_whole_path_components(tmp_path):
  """A recorded run that is not where it was recorded is looked for among the given runs by its last path
  components: whole components, leading dots kept, never a same-named folder's tail."""
  given = {str(tmp_path / "x" / n / "meta"): None for n in ("ab", "hidden", "b2")}
  given[str(tmp_path / "y" / "runs" / "meta")] = None
  where = str(tmp_path / "elsewhere" / "inc")
  assert report._resolve("runs/meta", given, "the meta run of inc", where) == str(tmp_path / "y" / "runs" / "meta")
  for recorded in ("b/meta", ".hidden/meta", "2/meta"):
    with pytest.raises(report.ModassemError, match=f"the meta run of inc {recorded} .* is not found"):
      report._resolve(recorded, given, "the meta run of inc", where)
  given[str(tmp_path / "z" / ".hidden" / "meta")] = None
  found = report._resolve(".hidden/meta", given, "the meta run of inc", where)
  assert found == str(tmp_path / "z" / ".hidden" / "meta")
