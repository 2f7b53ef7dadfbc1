"""Every test process sees 8 forced CPU devices, set before JAX touches a backend, one JAX compilation cache per
test run and, on CPU, XLA's backend optimization off."""

import atexit
import os
import shutil
import tempfile
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

# A run's repeated compiles load from one cache, shared through the environment with the xdist workers and the
# training subprocesses (a resumed process compiles the step its first process did: 37 -> 27 s for
# tests/train/test_train.py::test_sigkill_and_resume_gives_the_same_losses). Made by the first process, which
# removes it at exit; a JAX_COMPILATION_CACHE_DIR already set is used as is. An entry read while
# another process still writes it (or left half-written by a killed process) costs a warning and a recompile.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="lasp_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, cache, True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# The CPU tests' programs are small and run once, so LLVM's optimization of them costs more than it saves: with
# XLA's backend optimization off (jax_disable_most_optimizations; the HLO passes still run) the suite took 1012 s
# against 1355 on 2 cores (pytest -n 2; test_linear_attention.py 48 against 70 s, test_train.py 89 against 111).
# Exported so that xdist workers and training subprocesses inherit it; a value already set is kept, and a GPU run
# keeps the full optimization: its tests check the programs users run.
if jax.default_backend() == "cpu" and "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a GPU is present (the device machine: `pytest -m gpu`)."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fixed inputs in CI (a failure reproduces as is); LASP_TEST_SEED=random draws a fresh seed for a fuzz run, and
# any integer replays one.
DEFAULT_SEED = "0"


def pytest_configure(config):
    # One seed per run, shared with xdist workers through the environment.
    seed = os.environ.setdefault("LASP_TEST_SEED", DEFAULT_SEED)
    if seed == "random":
        os.environ["LASP_TEST_SEED"] = str(np.random.SeedSequence().entropy % 2**32)


def pytest_report_header(config):
    return f"random inputs: LASP_TEST_SEED={os.environ['LASP_TEST_SEED']} (set it to reproduce a run; =random to fuzz)"


@pytest.fixture
def rng(request):
    """Inputs from the run's seed (fixed unless LASP_TEST_SEED says otherwise) and the test's id."""
    return np.random.default_rng([int(os.environ["LASP_TEST_SEED"]), zlib.crc32(request.node.nodeid.encode())])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The header is hidden under -q; a failed run must still say how to reproduce its inputs.
    if exitstatus != 0:
        terminalreporter.write_line(pytest_report_header(config))
