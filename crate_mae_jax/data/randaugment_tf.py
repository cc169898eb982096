"""RandAugment in TensorFlow for the tf.data sources: timm's rand-m9-mstd0.5-inc1
op set, the same ops, magnitudes and probabilities as `augment_jax` (which holds the
constants), keyed by stateless seeds so that an example's augmentation depends only
on its position in the stream. TensorFlow is imported on first use.
"""
import functools

from crate_mae_jax.cli import tensorflow
from crate_mae_jax.data import augment_jax


def _tf_blend(degenerate, image, factor):
  tf = tensorflow()
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _tf_gray(image):
  tf = tensorflow()
  if image.shape[-1] == 1:
    return image
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def _tf_equalize_channel(c):
  tf = tensorflow()
  q = tf.cast(tf.clip_by_value(tf.round(c), 0, 255), tf.int32)
  hist = tf.math.bincount(tf.reshape(q, [-1]), minlength=256, maxlength=256)
  nonzero = tf.reshape(tf.where(hist > 0), [-1])
  last = tf.gather(hist, nonzero[-1])
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.float32)
  return tf.where(step == 0, c, tf.gather(lut, q))


def _tf_sharpness(image, factor):
  tf = tensorflow()
  h, w, c = image.shape
  if h < 3 or w < 3:
    return image
  k = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  k = tf.tile(k[:, :, None, None], [1, 1, c, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], k, [1, 1, 1, 1], "VALID")[0]
  inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner > 0, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return _tf_blend(degenerate, image, factor)


def _tf_op(name: str, image, level, sign):
  tf = tensorflow()
  h, w, _ = image.shape
  aj = augment_jax
  if name in aj.AFFINE_OPS:
    p = aj.affine_params(name, level, sign, h, w, xp=tf)
    transform = tf.cast(tf.stack(list(p) + [0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.constant([h, w]),
        fill_value=tf.constant(aj.FILL_VALUE), interpolation="BILINEAR",
        fill_mode="CONSTANT")[0]
    return out
  if name == "AutoContrast":
    lo = tf.reduce_min(image, [0, 1], keepdims=True)
    hi = tf.reduce_max(image, [0, 1], keepdims=True)
    return tf.where(hi > lo, (image - lo) * 255.0 / tf.where(hi > lo, hi - lo, 1.0), image)
  if name == "Equalize":
    return tf.stack([_tf_equalize_channel(image[..., i]) for i in range(image.shape[-1])], -1)
  if name == "Invert":
    return 255.0 - image
  if name == "Posterize":
    shift = tf.cast(8 - aj.posterize_bits(level, tf.floor), tf.int32)
    q = tf.cast(tf.clip_by_value(image, 0, 255), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(q, shift), shift), tf.float32)
  if name == "Solarize":
    return tf.where(image >= aj.solarize_threshold(level), 255.0 - image, image)
  if name == "SolarizeAdd":
    return tf.where(image < 128.0,
                    tf.clip_by_value(image + aj.solarize_add(level), 0.0, 255.0), image)
  if name == "Color":
    return _tf_blend(tf.broadcast_to(_tf_gray(image), tf.shape(image)), image,
                     aj.enhance_factor(level, sign))
  if name == "Contrast":
    mean = tf.reduce_mean(_tf_gray(image))
    return _tf_blend(tf.fill(tf.shape(image), mean), image, aj.enhance_factor(level, sign))
  if name == "Brightness":
    return _tf_blend(tf.zeros_like(image), image, aj.enhance_factor(level, sign))
  if name == "Sharpness":
    return _tf_sharpness(image, aj.enhance_factor(level, sign))
  raise ValueError(name)


def randaugment(image, seed, layers: int, magnitude: float):
  """timm-style RandAugment of a float (S, S, C) image in [0, 255], stateless."""
  tf = tensorflow()
  aj = augment_jax
  shape = image.shape
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, layers)):
    s = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
    op = tf.random.stateless_uniform([], s[0], 0, len(aj.RANDAUGMENT_OPS), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], s[1]) < aj.RANDAUGMENT_PROB
    level = tf.clip_by_value(
        magnitude + aj.RANDAUGMENT_MAGNITUDE_STD * tf.random.stateless_normal([], s[2]),
        0.0, 10.0) / 10.0
    sign = tf.where(tf.random.stateless_uniform([], s[3]) < 0.5, -1.0, 1.0)
    branches = [functools.partial(_tf_op, name, image, level, sign)
                for name in aj.RANDAUGMENT_OPS]
    current = image
    image = tf.cond(apply, lambda: tf.switch_case(op, branches), lambda: current)
    image.set_shape(shape)
  return image
