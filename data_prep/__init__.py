"""Data preparation for moe-fairseq: raw parallel text -> cleaned text -> sentencepiece -> fairseq data-bin.

Modules:
  prepare           moe-prepare: sources (file pairs, OPUS-100, FLORES, mtdata, --wmt10) -> data-bin
  readers           the formats corpora come in: plain, .gz, .tsv, WMT .sgm, .tmx
  layouts           where a released corpus keeps its files (OPUS-100, FLORES-200, mtdata, --pairs)
  sampling          the temperature-balanced sample sentencepiece is trained on
  parallel_files    cleaning of raw parallel files, sentencepiece training/encoding, fairseq dict writing
  pipeline          the shared clean -> spm -> encode -> binarize pipeline used by the recipes
  prepare_multi30k  Multi30k recipe (en, de, fr, cs)
  prepare_wmt10     WMT-10 (English <-> fr cs de fi lv et ro hi tr gu): what --wmt10 fetches, old layout
  synthetic_corpus  the embedded, download-free quickstart corpus (en -> xa, xb, xc)
"""
