"""The error raised for a bad option or input: one line that names the flag and what is allowed.

A subclass of ValueError, so library users can catch it as such; the fairseq command lines
print it as a single line instead of a traceback (see moe_fairseq.cli_errors).
"""


class MoEUsageError(ValueError):
    pass
