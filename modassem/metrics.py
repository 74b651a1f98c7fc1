"""Where a run reports: metrics.jsonl, TensorBoard, and the terminal."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import socket
import sys
import time

from modassem import files

METRICS_FILE = "metrics.jsonl"


def _plain(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class Writer:
  """Appends one JSON object per logged step or eval to metrics.jsonl; mirrors scalars to TensorBoard (tb/).

  On a local disk every record is appended at once. A bucket has no append, so
  there the file is rewritten whole, at most every `REMOTE_FLUSH_S` seconds,
  at each checkpoint (`flush`) and at the end: a run stopped in between loses
  only records past its last checkpoint, which its resume logs again.
  """

  REMOTE_FLUSH_S = 30.0

  def __init__(self, workdir, *, process_index: int = 0):
    self.path = files.path(workdir) / METRICS_FILE
    self.active = process_index == 0
    self._remote = files.is_remote(self.path)
    self._lines = None      # on a bucket: the whole file, written by `flush`
    self._dirty = False
    self._flushed_at = time.monotonic()
    self.aside = self.path.parent / "damaged" / METRICS_FILE
    self.set_aside = 0      # lines of metrics.jsonl that `resume` could not read, moved to `aside`
    self._events = _Events(self.path.parent / "tb", self._remote) if self.active else None

  def resume(self, step: int) -> float:
    """Drops records past `step` (logged after the checkpoint a resumed run starts from).

    Returns the wall time the run had spent by then, so `wall_s` keeps counting.
    """
    if not self.active:
      return 0.0
    kept, unreadable, wall = [], [], 0.0
    try:
      raw = self.path.read_bytes()
    except FileNotFoundError:
      raw = b""
    for line in raw.splitlines():
      try:
        text = line.decode("utf-8")
        rec = json.loads(text)
        rec_step = int(rec.get("step", 0))
      except (UnicodeDecodeError, ValueError, TypeError, AttributeError):
        unreadable.append(line)   # a line cut short by a kill, or damaged: kept aside, not trained on
        continue
      if rec_step <= step:
        kept.append(text + "\n")
        wall = max(wall, float(rec.get("wall_s", 0.0)))
    if unreadable:
      self.aside.parent.mkdir(parents=True, exist_ok=True)
      before = self.aside.read_bytes() if self.aside.exists() else b""
      files.write_bytes(self.aside, before + b"\n".join(unreadable) + b"\n")
      self.set_aside = len(unreadable)
    files.write_text(self.path, "".join(kept))
    self._lines = kept
    return wall

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.active:
      return
    line = json.dumps({"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}) + "\n"
    if self._remote:
      if self._lines is None:
        self._lines = (files.read_text(self.path) or "").splitlines(keepends=True)
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._flushed_at >= self.REMOTE_FLUSH_S:
        self.flush()
    else:
      files.append(self.path, line.encode())
    self._events.scalars(step, {f"{kind}/{k}": float(v) for k, v in values.items()
                                if k != "wall_s" and math.isfinite(float(v))})

  def flush(self) -> None:
    """Makes every record written so far durable (on a bucket: rewrites the file)."""
    if not self.active:
      return
    if self._dirty:
      files.write_text(self.path, "".join(self._lines))
      self._dirty = False
    self._flushed_at = time.monotonic()
    self._events.flush()

  def close(self):
    self.flush()


class _Events:
  """TensorBoard scalars in event files, written through `files` (and so to a bucket as to a disk).

  TensorBoard's own record framing and protos (the `tensorboard` package), not
  tf.summary: TensorFlow's file system is not the one run directories use. On
  a disk, one event file per run session, appended to; on a bucket, which has
  no append, each flush writes the events since the last one as a new event
  file, named to sort after the previous ones (TensorBoard reads a folder's
  event files in name order).
  """

  def __init__(self, folder, remote: bool):
    self.folder, self.remote = folder, remote
    self._stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._pending, self._count, self._file = [], 0, None

  @staticmethod
  def _record(event) -> bytes:
    """One event in TensorBoard's record framing (length, CRCs), by TensorBoard's own writer."""
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    RecordWriter(buf).write(event.SerializeToString())
    return buf.getvalue()

  @staticmethod
  def _event(**kwargs):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    return event_pb2.Event(wall_time=time.time(), **kwargs)

  def scalars(self, step: int, values: dict) -> None:
    if not values:
      return
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._pending.append(self._record(self._event(step=int(step), summary=summary)))
    if not self.remote:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    header = self._record(self._event(file_version="brain.Event:2"))
    if self.remote:
      self._count += 1
      (self.folder / f"{self._stem}.{self._count:06d}").write_bytes(header + b"".join(self._pending))
    else:
      if self._file is None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = self.folder / f"{self._stem}.modassem"
        files.append(self._file, header)
      files.append(self._file, b"".join(self._pending))
    self._pending = []


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  h, m = divmod(s // 60, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


class Progress:
  """The terminal: a progress bar when interactive, periodic log lines otherwise, and evaluations in both.

  Speed is the current rate: images per second over the last `WINDOW_S` seconds of training steps, restarted
  after an evaluation or a checkpoint (`paused`), so neither drags the figure down; with the step's FLOPs it is
  also TFLOP/s and, where the device's peak is known, MFU. `clock` is for tests.
  """

  WINDOW_S = 30.0

  def __init__(self, total: int, start: int, batch_size: int, mode: str = "auto", label: str = "",
               quiet: bool = False, *, step_flops: float = 0.0, peak_flops: float | None = None,
               num_devices: int = 1, clock=time.perf_counter):
    self.total, self.step, self.batch_size, self.label, self.quiet = total, start, batch_size, label, quiet
    self.step_flops, self.peak, self.num_devices, self._clock = step_flops, peak_flops, num_devices, clock
    interactive = sys.stderr.isatty() if mode == "auto" else mode == "on"
    self.bar = None
    if interactive and not quiet:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, desc=label, unit="step", dynamic_ncols=True)
    self._marks = collections.deque([(clock(), start)])
    self._last = 0.0

  def rate(self) -> float:
    """Images per second over the current window (the last measured rate right after a pause)."""
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    if s1 > s0 and t1 > t0:
      self._last = (s1 - s0) * self.batch_size / (t1 - t0)
    return self._last

  def rates(self) -> dict:
    """img_per_s, and tflop_per_s and mfu where the step's FLOPs (and the peak) are known."""
    img = self.rate()
    out = {"img_per_s": img}
    if self.step_flops:
      flops = img / self.batch_size * self.step_flops
      out["tflop_per_s"] = flops / 1e12
      if self.peak:
        out["mfu"] = flops / (self.peak * self.num_devices)
    return out

  def update(self, step: int):
    if step == self.step:
      return   # marked already (the trainer marks a logged step once it has finished; the window ends on self.step)
    if self.bar is not None:
      self.bar.update(step - self.step)
    self.step = step
    now = self._clock()
    self._marks.append((now, step))
    while len(self._marks) > 2 and now - self._marks[1][0] >= self.WINDOW_S:
      self._marks.popleft()

  def paused(self):
    """After time that was not training (an evaluation, a checkpoint): the window starts again from here."""
    self.rate()
    self._marks = collections.deque([(self._clock(), self.step)])

  def _speed(self) -> str:
    r = self.rates()
    text = f"{r['img_per_s']:.0f} img/s"
    if "tflop_per_s" in r:
      text += f" {r['tflop_per_s']:.3g} TFLOP/s"
    if "mfu" in r:
      text += f" MFU {100 * r['mfu']:.1f} %"
    return text

  def show(self, **values):
    if self.bar is not None:
      r = self.rates()
      extra = {"img_s": f"{r['img_per_s']:.0f}"}
      if "mfu" in r:
        extra["MFU"] = f"{100 * r['mfu']:.0f}%"
      self.bar.set_postfix(**extra, **{k: f"{v:.4g}" for k, v in values.items()})

  def log(self, step: int, **shown):
    """A line for logs (non-interactive runs): step, values, current speed, ETA."""
    if self.bar is not None or self.quiet:
      return
    rate = self.rate()
    eta = (self.total - step) * self.batch_size / rate if rate > 0 else float("nan")
    vals = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
    eta_s = _fmt_time(eta) if math.isfinite(eta) else "?"
    print(f"{self.label} step {step}/{self.total} {vals} {self._speed()} ETA {eta_s}", flush=True)

  def evaluation(self, step: int, results: dict):
    """An evaluation's result on screen, above the bar when there is one."""
    if self.quiet:
      return
    line = (f"{self.label} eval at step {step}/{self.total}: top-1 {results['top1']:.2f} %, "
            f"top-5 {results['top5']:.2f} %, loss {results['loss']:.4f}")
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
