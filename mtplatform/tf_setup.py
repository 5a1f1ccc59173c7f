"""TensorFlow is only seqio's input pipeline here: keep it on the CPU, quiet, and on few threads.

Call `configure_tensorflow()` before the first TensorFlow op runs (the CLI does it first thing), so that TF neither
grabs a GPU that torch needs nor spawns a thread per core that competes with torch's matrix products. By default
TensorFlow's C++ log (the `failed call to cuInit` line on machines without a GPU, cache warnings) and absl's
warnings (seqio's advice to cache tasks, its evaluator's logger) are hidden: errors reach the user as exceptions,
which `mtp` prints as one line. `mtp --verbose ...` shows them all.
"""

from __future__ import annotations

import logging
import os

_configured = False
verbose_logs = False  # `mtp --verbose`: other tools' logs (Apache Beam's workers too) reach the terminal


def configure_tensorflow(threads: int = 2, verbose: bool = False) -> None:
    """Hide GPUs from TensorFlow, cap its thread pools, silence its and absl's logs unless `verbose`; idempotent."""
    global _configured, verbose_logs
    if _configured:
        return
    verbose_logs = verbose
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    import tensorflow as tf
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # Apache Beam (`mtp cache`) warns about optional Google Cloud clients on the root logger
        logging.getLogger().setLevel(logging.ERROR)
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF's runtime already started (e.g. a test imported it first): it keeps its settings
    _configured = True
