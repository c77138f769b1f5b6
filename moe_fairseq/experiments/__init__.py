"""The library of scripts/: the study, the benchmarks, the plots and the machine checks.

Each scripts/<name>.py is a thin entry point into experiments/<name>.py (whose `main(argv)` the
tests call; `python -m moe_fairseq.experiments.<name>` is the same command).  Importing this
package imports nothing; nothing else in moe_fairseq imports it (docs/ARCHITECTURE.md)."""
