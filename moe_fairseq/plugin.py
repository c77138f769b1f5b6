"""moe_fairseq as a fairseq plugin: importing this module installs the fairseq patches and
registers the `transformer_moe` model, the `moe_label_smoothed_cross_entropy` criterion and the
`translation_multi_moe` task (their decorators register them: registering is the only side
effect of importing those modules).

The criterions/, models/ and tasks/ packages import this module first, so whichever fairseq (or
a program) imports first, the whole plugin is there: fairseq's `--user-dir moe_fairseq` imports
tasks/ and models/, and a model is never usable without its task and patches.
"""
from . import fairseq_patches

fairseq_patches.install()

from . import criterions, models, tasks  # noqa: E402,F401
