"""Metric writers and progress hooks (the only non-data module touching TF).

CLU's writers (TensorBoard + logging) are used where the tf.data pipeline has
loaded TensorFlow; elsewhere (in-memory data, hosts without TensorFlow) the same
interface writes TensorBoard event files with tensorboardX (or, without it, logs
scalars and writes images as PNG files), so training never imports TF for its logs.
"""
import math
import os
import sys
import time

from absl import logging
import numpy as np

from crate_mae_jax import cli


def _redacted(hparams: dict) -> dict:
  """hparams with passwords in URLs redacted (`config_lib.redacted`)."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.redacted(dict(hparams))


def _log_scalars(step, scalars) -> None:
  """One log line of the scalars, less those the progress line already shows."""
  shown = {k: v for k, v in scalars.items() if not k.startswith(PROGRESS_TAGS)}
  if shown:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in shown.items()))


def _clu_logging_writer():
  """clu's LoggingWriter with the hparams at debug level (they are in config.json and
  TensorBoard) and without the scalars the progress line shows."""
  from clu.metric_writers import logging_writer  # pylint: disable=import-outside-toplevel

  class _Quiet(logging_writer.LoggingWriter):

    def write_scalars(self, step, scalars):
      _log_scalars(step, scalars)

    def write_hparams(self, hparams):
      logging.debug("hparams: %s", hparams)

  return _Quiet()


class LoggingWriter:
  """Minimal stand-in for clu.metric_writers when TensorFlow is absent."""

  def __init__(self, logdir: str | None):
    self.logdir = logdir

  def write_scalars(self, step, scalars):
    _log_scalars(step, scalars)

  def write_images(self, step, images):
    if not self.logdir:
      return
    from PIL import Image
    os.makedirs(self.logdir, exist_ok=True)
    for name, img in images.items():
      arr = np.asarray(img)
      arr = arr[0] if arr.ndim == 4 else arr
      Image.fromarray(arr.astype(np.uint8).squeeze()).save(
          os.path.join(self.logdir, f"{name.replace('/', '_')}_{step}.png"))

  def write_texts(self, step, texts):
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def write_hparams(self, hparams):
    logging.debug("hparams: %s", _redacted(hparams))

  def flush(self):
    pass

  def close(self):
    pass


class _TensorboardXWriter(LoggingWriter):
  """TensorBoard event files through tensorboardX (pure Python, no TensorFlow), and
  the same log lines as the logging writer."""

  def __init__(self, logdir: str):
    super().__init__(None)
    from tensorboardX import SummaryWriter
    self.logdir = logdir
    self.tb = SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), step)

  def write_images(self, step, images):
    for k, img in images.items():
      arr = np.asarray(img)
      arr = arr[0] if arr.ndim == 4 else arr
      self.tb.add_image(k, arr, step, dataformats="HW" if arr.ndim == 2 else "HWC")

  def write_texts(self, step, texts):
    super().write_texts(step, texts)
    for k, v in texts.items():
      self.tb.add_text(k, str(v), step)

  def write_hparams(self, hparams):
    super().write_hparams(hparams)
    # A run of its own, as TB expects.
    self.tb.add_hparams(_redacted(dict(hparams)), {}, name="hparams")

  def flush(self):
    self.tb.flush()

  def close(self):
    self.tb.close()


def create_writer(logdir: str, is_chief: bool):
  """TensorBoard + logging writer on the chief, logging-only elsewhere. CLU's writers
  where TensorFlow is loaded already (the tf.data input pipeline); otherwise the chief
  writes the event files with tensorboardX, since importing TensorFlow for the writer
  alone would add its import time to the start of every in-memory run."""
  if "tensorflow" in sys.modules:
    cli.import_tensorflow_quietly()  # the devices hidden from TensorFlow, its logs quiet
    try:
      from clu import metric_writers
    except ImportError:
      metric_writers = None
    if metric_writers is not None:
      writers = [_clu_logging_writer()]
      if is_chief:
        writers.append(metric_writers.SummaryWriter(os.fspath(logdir)))
      return metric_writers.AsyncMultiWriter(writers)
  if not is_chief:
    return LoggingWriter(None)
  try:
    return _TensorboardXWriter(logdir)
  except ImportError:
    logging.warning("tensorboardX unavailable (and TensorFlow not loaded): metrics go to "
                    "the log only")
    return LoggingWriter(logdir)


def duration(seconds: float) -> str:
  """3m12s, 45s, 1h02m: to the second under an hour."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def model_flops_per_step(config, resolved) -> float | None:
  """Model FLOPs of one pre-training step of the global batch: 3 × the analytic
  forward count of `tools/benchmark.py` (forward + backward); None for the other
  tasks (pass the step's `cost_analysis()` flops there)."""
  from crate_mae_jax.training import tasks  # pylint: disable=import-outside-toplevel
  if tasks.get(config.task).classifies:
    return None
  from crate_mae_jax.tools import benchmark  # pylint: disable=import-outside-toplevel
  return 3 * benchmark.forward_flops(resolved, config.data.image_size, resolved["mask_ratio"],
                                     config.batch_size) * config.batch_size


def chip_peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind (the planner's table)."""
  from crate_mae_jax import chips  # pylint: disable=import-outside-toplevel
  chip = chips.CHIPS.get(device_kind)
  return chip.peak_flops if chip else None


# Written by the progress line itself: the metric writer's log line leaves them out.
PROGRESS_TAGS = ("steps_per_sec", "perf/")


class Progress:
  """The progress line: steps/s, img/s and model TFLOP/s per device, MFU against
  the chip's peak (`chips.CHIPS`; other chips: no MFU, said once), all since the
  first step's end (the compile left out), and the ETA to the second; the last
  step's line is the whole run's rate. The writer gets each interval's rates."""

  def __init__(self, num_train_steps: int, writer, every_secs: float = 30.0, *,
               flops_per_step: float | None = None, global_batch: int | None = None,
               num_devices: int | None = None, device_kind: str | None = None,
               clock=time.monotonic):
    self.total, self.writer, self.every = num_train_steps, writer, every_secs
    self.flops, self.batch, self.clock = flops_per_step, global_batch, clock
    if num_devices is None or device_kind is None:
      import jax  # pylint: disable=import-outside-toplevel
      num_devices = jax.device_count() if num_devices is None else num_devices
      device_kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    self.devices, self.kind = num_devices, device_kind
    self.peak = chip_peak_flops(device_kind) if flops_per_step else None
    self.last_time = self.last_step = self.first_time = self.first_step = None
    self._said_no_peak = False

  def rates(self, steps: int, seconds: float) -> dict:
    """steps/s and, given the batch and FLOPs, per-device img/s, TFLOP/s and MFU."""
    rate = steps / seconds if seconds > 0 else 0.0
    out = {"steps_per_sec": rate}
    if self.batch:
      out["perf/img_per_sec_per_device"] = rate * self.batch / self.devices
    if self.flops:
      out["perf/tflops_per_device"] = rate * self.flops / self.devices / 1e12
      if self.peak:
        out["perf/mfu"] = rate * self.flops / self.devices / self.peak
    return out

  def describe(self, r: dict) -> str:
    parts = [f"{r['steps_per_sec']:.2f} steps/s"]
    if "perf/img_per_sec_per_device" in r:
      parts.append(f"{r['perf/img_per_sec_per_device']:,.0f} img/s per device")
    if "perf/tflops_per_device" in r:
      parts.append(f"{r['perf/tflops_per_device']:.3g} TFLOP/s per device")
    if "perf/mfu" in r:
      parts.append(f"MFU {100 * r['perf/mfu']:.1f}%")
    return ", ".join(parts)

  def __call__(self, step: int):
    now = self.clock()
    if self.last_time is None:
      self.last_time = self.first_time = now
      self.last_step = self.first_step = step
      if self.flops and not self.peak and not self._said_no_peak:
        self._said_no_peak = True
        logging.info("MFU not shown: no peak FLOP/s known for %r (crate_mae_jax/chips.py)",
                     self.kind)
      return
    last = step >= self.total
    if now - self.last_time < self.every and not last:
      return
    # Steps are dispatched asynchronously, so one interval's rate swings with the
    # metric fetches; the console and the ETA use the rate since the first step.
    run = self.rates(step - self.first_step, now - self.first_time)
    eta = (self.total - step) / run["steps_per_sec"] if run["steps_per_sec"] > 0 else math.inf
    if last:
      logging.info("step %d/%d: trained steps %d-%d in %s, %s over the run (compile left "
                   "out)", step, self.total, self.first_step, step,
                   duration(now - self.first_time), self.describe(run))
    else:
      logging.info("step %d/%d (%.1f%%): %s, ETA %s", step, self.total,
                   100 * step / self.total, self.describe(run), duration(eta))
    self.writer.write_scalars(step, self.rates(step - self.last_step, now - self.last_time))
    self.last_time, self.last_step = now, step


def progress_hooks(num_train_steps: int, writer, logdir: str, is_chief: bool,
                   profile_steps: int = 0, every_secs: float = 30.0, *,
                   flops_per_step: float | None = None,
                   global_batch: int | None = None) -> list:
  """The progress line (`Progress`) and, when asked, a profiler trace (clu Profile).
  `flops_per_step`: model FLOPs of one step of the global batch
  (`model_flops_per_step`), for TFLOP/s and MFU; `global_batch`: for img/s."""
  hooks = [Progress(num_train_steps, writer, every_secs, flops_per_step=flops_per_step,
                    global_batch=global_batch)]
  if not (is_chief and profile_steps):
    return hooks
  cli.import_tensorflow_quietly()  # clu's periodic_actions imports TensorFlow
  try:
    from clu import periodic_actions
  except ImportError:
    logging.warning("profile_steps=%d: clu.periodic_actions unavailable, no trace",
                    profile_steps)
    return hooks
  hooks.append(periodic_actions.Profile(logdir=logdir, num_profile_steps=profile_steps,
                                        first_profile=10))
  return hooks


class _DropLibraryInfo:
  """Keeps warnings and errors of the named libraries, drops their info lines."""

  def __init__(self, libraries: tuple[str, ...]):
    self.markers = tuple(f"/{name}/" for name in libraries)

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(m in record.pathname for m in self.markers)


def quiet_library_logs(libraries: tuple[str, ...] = ("orbax", "tensorflow_datasets")) -> None:
  """Orbax logs several info lines per checkpoint; keep the training log readable."""
  import logging as std_logging
  std_logging.getLogger("absl").addFilter(_DropLibraryInfo(libraries))
