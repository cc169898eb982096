"""Input: the dataset registry, tf.data and in-memory sources, augmentation."""
