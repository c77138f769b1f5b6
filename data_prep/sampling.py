"""The temperature-balanced sample that the joint sentencepiece model is trained on.

With raw proportions, 10M French pairs swamp 80k Gujarati ones and Gujarati ends up split into
characters. Language l, with n_l train sentences, gets the share

    p_l = n_l^(1/T) / sum_k n_k^(1/T)

of the sample: T = 1 keeps the raw proportions, larger T flattens them, T -> inf is uniform. This
is the formula of fairseq's temperature sampler over directions (--sampling-method temperature
--sampling-temperature T), so the vocabulary sees the languages as training will.
"""

import random

from data_prep.parallel_files import atomic_outputs, count_lines, iter_lines


def temperature_shares(sizes, temperature):
    """{lang: p_l} for {lang: n_l}; languages without sentences get 0."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    weights = {lang: (n ** (1.0 / temperature) if n > 0 else 0.0) for lang, n in sizes.items()}
    total = sum(weights.values())
    return {lang: w / total for lang, w in weights.items()}


def _pool(paths):
    """The sentences of one language: its side of every pair, in order."""
    for path in paths:
        yield from iter_lines(path)


def balanced_sample(files_by_lang, out_paths, sample_size, temperature, seed=1):
    """Writes round(S * p_l) sentences of each language l to out_paths[l], where
    S = min(sample_size, all sentences): a small corpus is not blown up to sample_size.

    files_by_lang: {lang: [cleaned train files holding that language]}. A language with fewer
    sentences than its quota is repeated (every sentence q times, plus a random remainder), so
    the sample has exactly its share. Returns {lang: {"sentences", "share", "sampled"}}.
    """
    sizes = {lang: sum(count_lines(p) for p in paths) for lang, paths in files_by_lang.items()}
    shares = temperature_shares(sizes, temperature)
    sample_size = min(sample_size, sum(sizes.values()))
    rng = random.Random(seed)
    report = {}
    for lang in sorted(files_by_lang):
        n, quota = sizes[lang], round(sample_size * shares[lang])
        repeats, rest = divmod(quota, n) if n else (0, 0)
        extra = set(rng.sample(range(n), rest))
        with atomic_outputs([out_paths[lang]]) as (out,):
            for i, line in enumerate(_pool(files_by_lang[lang])):
                out.write((line + "\n") * (repeats + (i in extra)))
        report[lang] = {"sentences": n, "share": round(shares[lang], 6), "sampled": quota}
    return report
