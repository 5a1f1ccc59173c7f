"""TensorFlow is only seqio's input pipeline here: keep it on the CPU, quiet, and on few threads.

Call `configure_tensorflow()` before the first TensorFlow op runs (the CLI does it first thing), so that TF neither
grabs a GPU that torch needs nor spawns a thread per core that competes with torch's matrix products.
"""

from __future__ import annotations

import os

_configured = False


def configure_tensorflow(threads: int = 2) -> None:
    """Hide GPUs from TensorFlow and cap its thread pools; idempotent."""
    global _configured
    if _configured:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF's runtime already started (e.g. a test imported it first): it keeps its settings
    _configured = True
