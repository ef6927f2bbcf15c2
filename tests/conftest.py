"""Test-wide setup.

Eight virtual CPU devices, so data-parallel sharding is tested on a one-CPU machine
(set before JAX is imported by any test module).
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the AOT tests compile for compile-only TPU devices) takes a machine-wide lock file
# unless told other processes may load it too (parallel test workers, other jobs).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# TensorFlow (tf.data only) must stay quiet and off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
