"""crate-mae-jax: CRATE-MAE (white-box masked autoencoder) in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "absl-py>=2.1",
    "numpy>=1.26",
    "pillow>=10",
]
# TensorFlow is only needed by the tf.data input pipeline (TFDS, image folders)
# and TensorBoard summaries; GPU hosts can train from in-memory arrays without it.
TF = ["tensorflow-cpu>=2.21; platform_machine=='x86_64'",
      "tensorflow-datasets>=4.9.10", "tensorboard>=2.21"]
TORCH = ["torch>=2.4"]

setup(
    name="crate-mae-jax",
    version="0.1.0",
    description="CRATE-MAE (Pai et al., ICLR 2024) in JAX/Flax, matching the official code",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["crate_mae_jax", "crate_mae_jax.*"]),
    package_data={"crate_mae_jax": ["data/*.npz"]},
    install_requires=CORE,
    extras_require={
        "tf": TF,
        "torch": TORCH,
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "dev": TF + TORCH + ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": [
        "crate-mae-train=crate_mae_jax.main:run",
        "crate-mae-convert=crate_mae_jax.convert_torch:run",
        "crate-mae-eval=crate_mae_jax.evaluate:run",
    ]},
)
