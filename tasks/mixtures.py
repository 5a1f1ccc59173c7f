"""Mixtures of the built-in tasks.

- `glue_proportional` (in `tasks.glue`): the T5 paper's GLUE multi-task mixture.
- `span_corruption_and_glue`: T5's unsupervised objective mixed with the GLUE tasks whose training files ship in the
  shared data (CoLA, SST-2, MRPC, STS-B, RTE, WNLI), examples-proportional with the T5 paper's cap K: a task's rate
  is min(examples, K) with K = 2**14, so span corruption's 118k lines do not drown the small tasks.
"""

from __future__ import annotations

import functools

import seqio

from tasks import glue, unsupervised  # noqa: F401  (registers the tasks mixed here)

CAP_K = 2**14
SHARED_GLUE = ("glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_rte", "glue_wnli")

seqio.MixtureRegistry.add(
    "span_corruption_and_glue",
    ["span_corruption", *SHARED_GLUE],
    default_rate=functools.partial(seqio.mixing_rate_num_examples, maximum=CAP_K),
)
