"""The command line of an experiment whose bad input is a MoEUsageError: one line on stderr."""
from ..cli_errors import install_excepthook


def one_line_errors(main):
    """cli_main(argv=None): `main(argv)` with moe_fairseq's excepthook installed first, so a
    MoEUsageError prints as `moe_fairseq: error: ...`, not as a traceback."""
    def cli_main(argv=None):
        install_excepthook()
        return main(argv)
    return cli_main
