"""TensorFlow is only seqio's input pipeline here: keep it on the CPU, quiet, and on few threads, and load it only
where a command uses it.

`configure_logs()` runs first thing in `mtp` and imports nothing heavy: it sets TensorFlow's C++ log level (read when
TensorFlow loads) and absl's. `configure_tensorflow()` imports TensorFlow and must run before its first op, so that TF
neither grabs a GPU that torch needs nor spawns a thread per core that competes with torch's matrix products; the CLI
calls it only for commands that read data (`mtp --help`, `mtp report` and `mtp export` never load TensorFlow, and
start in a second or two instead of 10 to 20). By default TensorFlow's C++ log (the `failed call to cuInit` line on
machines without a GPU, cache warnings) and absl's warnings (seqio's advice to cache tasks, its evaluator's logger)
are hidden: errors reach the user as exceptions, which `mtp` prints as one line. `mtp --verbose ...` shows them all.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # TensorFlow itself loads only in `configure_tensorflow`
    import tensorflow as tf

_configured = False
_logs_configured = False
verbose_logs = False  # `mtp --verbose`: other tools' logs (Apache Beam's workers too) reach the terminal


def configure_logs(verbose: bool = False) -> None:
    """Silence TensorFlow's C++ log (before it loads), absl's and the root logger's, unless `verbose`; idempotent."""
    global _logs_configured, verbose_logs
    if _logs_configured:
        return
    verbose_logs = verbose
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # Apache Beam (`mtp cache`) warns about optional Google Cloud clients on the root logger
        logging.getLogger().setLevel(logging.ERROR)
    _logs_configured = True


def configure_tensorflow(threads: int = 2, verbose: bool = False) -> None:
    """Load TensorFlow with its GPUs hidden and its thread pools capped (logs as `configure_logs`); idempotent."""
    global _configured
    if _configured:
        return
    configure_logs(verbose)
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF's runtime already started (e.g. a test imported it first): it keeps its settings
    _configured = True


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuning thread: its AUTOTUNE parallelism then stays at TensorFlow's threads
    (`configure_tensorflow`'s 2), its AUTOTUNE prefetch buffers grow only when a consumer waits. The examples and
    their order are the same; the iterator's structure can differ (autotuning inserts prefetches), so a saved
    position records it (`data.BatchIterator`). The training input pipeline waited as long either way
    (`benchmarks/input_pipeline.py --quick --online`: 0.29% of its time, 0.97% online, against 0.35% and 0.88%).

    Why: deleting an iterator waits for that thread to end, and TensorFlow 2.20's thread can sleep through the
    wake-up (the cancellation notifies it before it counts as cancelled, `CancellationManager::StartCancel`) until
    its next optimization, which comes ever later: the period doubles from 10 ms to 60 s. So the end of a training
    run, which deletes its iterators, could sleep a minute per iterator: in mixing_strategies.gin side by side, an
    online-mixing stage (8 task iterators) took 71, 111 and 170 s instead of about 50 in 3 of 8 runs (0 of 6 without
    the thread), and a loop that deleted an iterator after 6 s slept 4.2 s once in 6 on an idle machine.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
