"""What a run shows while it runs: the start-up summary, the current speed (img/s, TFLOP/s, MFU) and evaluations."""

import json
import os
import re

import pytest

from conftest import TINY
from modassem import cli, summary
from modassem.metrics import Progress


class Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t


def test_speed_is_the_current_rate_over_a_window():
  clock = Clock()
  p = Progress(1000, 0, batch_size=10, mode="off", quiet=True, step_flops=1e12, peak_flops=4e12, num_devices=1,
               clock=clock)
  for step in range(1, 61):        # 60 s at 10 img/s
    clock.t += 1.0
    p.update(step)
  assert p.rate() == pytest.approx(10.0)
  for step in range(61, 181):      # then 60 s at 20 img/s: the window holds only these
    clock.t += 0.5
    p.update(step)
  assert p.rate() == pytest.approx(20.0, rel=0.02)   # the run's average would be 1800 / 120 = 15
  # 100 s of evaluation, then training at 20 img/s again: the pause is not training time.
  clock.t += 100.0
  p.paused()
  assert p.rate() == pytest.approx(20.0, rel=0.02)  # the last rate until new steps are measured
  for step in range(181, 191):
    clock.t += 0.5
    p.update(step)
  rates = p.rates()
  assert rates["img_per_s"] == pytest.approx(20.0)
  assert rates["tflop_per_s"] == pytest.approx(2.0)      # 2 steps/s of 1 TFLOP
  assert rates["mfu"] == pytest.approx(0.5)              # of a 4 TFLOP/s device
  # Without the pause, the same steps would have been measured across the evaluation.
  q = Progress(1000, 0, batch_size=10, mode="off", quiet=True, clock=clock)
  clock.t += 100.0
  for step in range(1, 11):
    clock.t += 0.5
    q.update(step)
  assert q.rate() < 2.0 and "tflop_per_s" not in q.rates()


def test_peaks_are_known_for_half_precision_on_known_accelerators():
  assert summary.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert summary.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert summary.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert summary.peak_flops("TPU v4", "bfloat16") == 275e12
  assert summary.peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
  assert summary.peak_flops("cpu", "bfloat16") is None


def test_a_run_says_what_it_runs_and_shows_its_evaluations(tmp_path, capsys):
  workdir = tmp_path / "run"
  capsys.readouterr()
  assert cli.main(["train", f"--config={TINY}:meta", "--config.progress=on", "--config.eval_every_steps=3",
                   f"--workdir={workdir}"]) == 0
  captured = capsys.readouterr()
  out = captured.out + captured.err
  for needle in [r"meta: JAX \d+\.\d+\.\d+ on cpu: 1 x cpu, 1 process\(es\)", r"mesh 1 data, sharding data",
                 r"batch 32 \(32 per device\)", r"0\.0142 M parameters, 0\.0142 M trained; [\d.]+ GFLOP per step",
                 r"6 steps, 0\.134 epochs of 1437 examples", r"meta: compiling\.\.\.", r"meta: compiled in [\d.]+ s"]:
    assert re.search(needle, out), (needle, out)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  ev = next(r for r in records if r["kind"] == "eval" and r["step"] == 3)
  # In terminal mode (a progress bar) the evaluation is printed above the bar.
  assert f"meta eval at step 3/6: top-1 {ev['top1']:.2f} %" in captured.out, captured.out
  setup = next(r for r in records if r["kind"] == "setup")
  assert (setup["params_trained"], setup["batch_per_device"], setup["steps"]) == (14202, 32, 6)
  assert setup["compile_s"] > 0 and setup["step_flops"] > 0
  train = [r for r in records if r["kind"] == "train"]
  assert all(r["img_per_s"] > 0 and r["tflop_per_s"] > 0 and "mfu" not in r for r in train)


def test_the_speed_logged_after_an_evaluation_counts_the_steps_own_time(tmp_path, monkeypatch):
  """An evaluation at step 3 restarts the speed's window; the line logged at step 5 must measure it up to step 5
  finished, not up to step 4 dispatched (asynchronous dispatch returns at once: a window of dispatches alone read
  hundreds of times the real speed)."""
  logged = []
  real_log = Progress.log

  def log(self, step, **shown):
    logged.append((step, self._marks[-1][1]))   # the logged step, and the last step its window holds
    return real_log(self, step, **shown)

  monkeypatch.setattr(Progress, "log", log)
  assert cli.main(["train", f"--config={TINY}:meta", "--config.eval_every_steps=3", "--config.log_every_steps=5",
                   f"--workdir={tmp_path / 'run'}"]) == 0
  assert logged == [(5, 5), (6, 6)]
