"""`python -m moe_fairseq.evaluate`, the invocation of moe-evaluate that configs/README.md shows:
the program is moe_fairseq.tools.evaluate."""

if __name__ == "__main__":
    from moe_fairseq.tools.evaluate import cli_main

    cli_main()
