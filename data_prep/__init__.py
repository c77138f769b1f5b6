"""Data preparation for moe-fairseq: raw parallel text -> cleaned text -> sentencepiece -> fairseq data-bin.

Modules:
  parallel_files    cleaning of raw parallel files, sentencepiece training/encoding, fairseq dict writing
  pipeline          the shared clean -> spm -> encode -> binarize pipeline used by the recipes
  prepare_multi30k  Multi30k recipe (en, de, fr, cs)
  prepare_wmt10     WMT-10 recipe (English <-> fr cs de fi lv et ro hi tr gu)
  synthetic_corpus  the embedded, download-free quickstart corpus (en -> xa, xb, xc)
"""
