"""Where a run reports: metrics.jsonl, TensorBoard, and the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time

METRICS_FILE = "metrics.jsonl"


def _plain(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class Writer:
  """Appends one JSON object per logged step or eval; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, *, process_index: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.active = process_index == 0
    self._tb_dir = os.path.join(workdir, "tb")
    self._tb = None

  def resume(self, step: int) -> float:
    """Drops records past `step` (logged after the checkpoint a resumed run starts from).

    Returns the wall time the run had spent by then, so `wall_s` keeps counting.
    """
    if not self.active or not os.path.exists(self.path):
      return 0.0
    kept, wall = [], 0.0
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue   # a line cut short by a kill
        if rec.get("step", 0) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
          wall = max(wall, float(rec.get("wall_s", 0.0)))
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)
    return wall

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.active:
      return
    rec = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    self._write_tb(step, kind, values)

  def _write_tb(self, step, kind, values):
    if self._tb is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(self._tb_dir)
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        if k != "wall_s" and math.isfinite(float(v)):
          self._tf.summary.scalar(f"{kind}/{k}", float(v))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  h, m = divmod(s // 60, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


class Progress:
  """A progress bar with img/s and ETA when interactive; periodic log lines otherwise."""

  def __init__(self, total: int, start: int, batch_size: int, mode: str = "auto", label: str = "",
               quiet: bool = False):
    self.total, self.step, self.batch_size, self.label, self.quiet = total, start, batch_size, label, quiet
    interactive = sys.stderr.isatty() if mode == "auto" else mode == "on"
    self.bar = None
    if interactive:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True)
    self._t0, self._s0 = time.perf_counter(), start

  def rate(self) -> float:
    dt = time.perf_counter() - self._t0
    return (self.step - self._s0) * self.batch_size / dt if dt > 0 else 0.0

  def update(self, step: int):
    if self.bar is not None:
      self.bar.update(step - self.step)
    self.step = step

  def show(self, **values):
    if self.bar is not None:
      self.bar.set_postfix(img_s=f"{self.rate():.0f}", **{k: f"{v:.4g}" for k, v in values.items()})

  def log(self, step: int, **shown):
    """A line for logs (non-interactive runs): step, values, img/s, ETA."""
    if self.bar is not None or self.quiet:
      return
    rate = self.rate()
    eta = (self.total - step) * self.batch_size / rate if rate > 0 else float("nan")
    vals = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
    eta_s = _fmt_time(eta) if math.isfinite(eta) else "?"
    print(f"{self.label} step {step}/{self.total} {vals} {rate:.0f} img/s ETA {eta_s}", flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
