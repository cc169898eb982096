"""Metric writers and progress hooks (the only non-data module touching TF).

CLU's writers (TensorBoard + logging) and periodic actions are used when they
import; on hosts without TensorFlow the same interface writes TensorBoard event
files with tensorboardX (or, without it, logs scalars and writes images as PNG
files), so training never needs TF.
"""
import os
import time

from absl import logging
import numpy as np

from crate_mae_jax import cli


def _redacted(hparams: dict) -> dict:
  """hparams with passwords in URLs redacted (`config_lib.redacted`)."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.redacted(dict(hparams))


class LoggingWriter:
  """Minimal stand-in for clu.metric_writers when TensorFlow is absent."""

  def __init__(self, logdir: str | None):
    self.logdir = logdir

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

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
    logging.info("hparams: %s", _redacted(hparams))

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
  """TensorBoard + logging writer on the chief, logging-only elsewhere. Without
  TensorFlow (no CLU writers) the chief writes event files with tensorboardX."""
  cli.import_tensorflow_quietly()  # clu's metric_writers imports TensorFlow
  try:
    from clu import metric_writers
  except ImportError:
    if is_chief:
      try:
        return _TensorboardXWriter(logdir)
      except ImportError:
        pass
    logging.warning("clu.metric_writers and tensorboardX unavailable: metrics go to the "
                    "log only")
    return LoggingWriter(logdir if is_chief else None)
  return metric_writers.create_default_writer(logdir, just_logging=not is_chief,
                                              asynchronous=True)


class Progress:
  """steps/s and ETA in the log, for hosts without clu.periodic_actions."""

  def __init__(self, num_train_steps: int, writer, every_secs: float = 30.0):
    self.total, self.writer, self.every = num_train_steps, writer, every_secs
    self.last_time, self.last_step = None, None

  def __call__(self, step: int):
    now = time.monotonic()
    if self.last_time is None:
      self.last_time, self.last_step = now, step
      return
    if now - self.last_time < self.every:
      return
    rate = (step - self.last_step) / (now - self.last_time)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    logging.info("step %d/%d (%.1f%%): %.2f steps/s, ETA %.0f min", step, self.total,
                 100 * step / self.total, rate, eta / 60)
    self.writer.write_scalars(step, {"steps_per_sec": rate})
    self.last_time, self.last_step = now, step


def progress_hooks(num_train_steps: int, writer, logdir: str, is_chief: bool,
                   profile_steps: int = 0, every_secs: float = 30.0) -> list:
  """ReportProgress (steps/s, ETA) and, when asked, a profiler trace."""
  cli.import_tensorflow_quietly()  # clu's periodic_actions imports TensorFlow
  try:
    from clu import periodic_actions
  except ImportError:
    return [Progress(num_train_steps, writer, every_secs)]
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_secs=every_secs)]
  if is_chief and profile_steps:
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
