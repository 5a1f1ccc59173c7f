"""Mixtures of the built-in tasks, named by the tasks they hold; their rates come from the configured strategy
(`mtplatform.mixing`: `--gin.mixing.strategy=...`, default examples-proportional with K = 2**14).

- `glue`: every GLUE task with a training set (`glue_mnli_mismatched` shares MNLI's and is left out).
- `glue_proportional`: the T5 paper's GLUE mixture (no WNLI, as in `t5.data.mixtures`), examples-proportional
  without a cap unless gin says otherwise.
- `supervised`: GLUE, SQuAD v1.1 (`squad_v1`) and CoNLL-2003; `supervised_and_span_corruption` adds T5's objective.
- `leave_one_out_<task>` for every supervised task: the other supervised tasks and span corruption (the T5 paper's
  "leave-one-out" strategy, made in a loop as `t5.data.mixtures` makes its own).
- `span_corruption_and_glue`: span corruption with the GLUE tasks whose training files ship in the shared data.
- `shared_supervised_and_span_corruption`: span corruption with every supervised task whose training data ships in
  the shared data (SQuAD as `squad_v1_devsplit`): the tasks of gin/experiments/mixing_strategies.gin, and the
  mixture `mtp mixture search` is validated on (results/mixture_search/).

Data shipped here lacks the training files of QQP, MNLI, QNLI and SQuAD: mixtures holding them fail with an error
that names the file, unless `--gin.mixing.drop_tasks_without_data=True`.
"""

from __future__ import annotations

from mtplatform import mixing
from tasks import conll, glue, squad, unsupervised  # noqa: F401  (registers the tasks mixed here)

GLUE = tuple(t for t in glue.GLUE_TASKS if t != "glue_mnli_mismatched")
T5_GLUE = tuple(t for t in GLUE if t != "glue_wnli")
SUPERVISED = (*GLUE, "squad_v1", "conll2003_ner")
SHARED_GLUE = ("glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_rte", "glue_wnli")
SHARED_SUPERVISED = ("glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_rte", "squad_v1_devsplit",
                     "conll2003_ner")

mixing.register("glue", GLUE)
mixing.register("glue_proportional", T5_GLUE, cap=None)
mixing.register("supervised", SUPERVISED)
mixing.register("supervised_and_span_corruption", [*SUPERVISED, "span_corruption"])
mixing.register("span_corruption_and_glue", ["span_corruption", *SHARED_GLUE])
mixing.register("shared_supervised_and_span_corruption", [*SHARED_SUPERVISED, "span_corruption"])

LEAVE_ONE_OUT = tuple(f"leave_one_out_{task}" for task in SUPERVISED)
for _task in SUPERVISED:
    mixing.register(f"leave_one_out_{_task}", [t for t in SUPERVISED if t != _task] + ["span_corruption"])
