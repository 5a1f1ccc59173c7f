"""The built-in task catalogue: importing this package registers every task and mixture with seqio.

GLUE (`glue_*`), SQuAD v1.1 (`squad_v1`, `squad_v1_devsplit`), CoNLL-2003 NER (`conll2003_ner`), the
unsupervised objectives on the text corpus (`span_corruption`, `bert_mlm`, `iid_denoising`, `prefix_lm`) and the
mixtures of `tasks.mixtures`.
"""

from tasks import conll, glue, mixtures, squad, unsupervised  # noqa: F401  (registration happens on import)
