"""moe-fairseq: Mixture-of-Experts layers, routers and regularisers for fairseq translation.

Importing this package, or its layer library `moe_fairseq.moe` (torch only), imports no fairseq
and changes nothing.  fairseq is joined in one place, `moe_fairseq.plugin`: importing it
installs the fairseq patches (fairseq_patches.py) and registers the model, criterion and task.
`fairseq-train --user-dir moe_fairseq` does that for you: fairseq imports the tasks/ and models/
of a user directory, and they import the plugin.  A program that uses fairseq without
--user-dir imports `moe_fairseq.plugin` itself.  See docs/ARCHITECTURE.md.
"""
