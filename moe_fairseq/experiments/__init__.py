"""What the experiment scripts of scripts/ (benchmarks, the study) and the tests share."""
