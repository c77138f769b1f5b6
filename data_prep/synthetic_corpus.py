"""The embedded quickstart corpus: English -> three invented languages, generated, no download.

A seeded generator writes line-aligned {split}.{lang} files for en, xa, xb, xc (splits train,
valid, test; no English sentence appears in two splits). 57 English words, 3-10 words a sentence;
the rules are simple enough for a tiny transformer to learn in minutes on 2 CPU cores, but every
target word differs from English, so copying the source scores near-zero BLEU.

The grammar (NP = noun phrase: determiner [adjective] [colour] noun)::

    en  S V [O] [P NP] [ADV]      the big dog sees two red cars near a house today
    xa  like en, adjective and colour AFTER the noun, plural particle "li" after the noun
    xb  SOV: S [O wo] [NP P] [ADV] V, object particle "wo", postpositions, plural "mo" before
        the noun
    xc  V S [O] [P NP] [ADV], every noun phrase REVERSED (noun colour adjective determiner),
        plural suffix "-ek" on the noun, verb suffix "-at" when the subject is plural

CLI: python -m data_prep.synthetic_corpus --out DIR [--binarize DATA_BIN [--targets xa,xb,xc]]
"""

import argparse
import os
import random
import sys

from data_prep.parallel_files import DataPrepError, atomic_outputs

LANGS = ("en", "xa", "xb", "xc")
TARGETS = ("xa", "xb", "xc")

# category  english[/plural or base form]  xa  xb  xc  -- one word a line.
# Number-neutral determiners ("the") work with both numbers; DETS is singular only, PDET plural.
_LEXICON = """
DET   the              lo      za       ten
DET   a                un      hito     jed
DET   this             esto    kono     tot
DET   that             kelo    sono     onen
PDET  these            esti    korera   toti
PDET  those            keli    sorera   oneni
PDET  two              dua     nii      dva
PDET  three            tre     sanu     tri
PDET  four             kuatro  yonu     chetir
PDET  five             sinko   gonu     pet
ADJ   big              grando  ookii    velik
ADJ   small            piko    chiisai  mal
ADJ   old              vekjo   furui    star
ADJ   young            jovo    wakai    mlad
ADJ   happy            felice  ureshii  rad
ADJ   tired            stanko  tsukare  ustal
COL   red              roso    akai     kras
COL   blue             azur    aoi      sin
COL   green            verde   midori   zelen
COL   black            nero    kuro     chern
COL   white            bianko  shiro    bel
COL   yellow           jalo    kiiro    zhelt
N     dog/dogs         kane    inu      pes
N     cat/cats         gatu    neko     kosh
N     bird/birds       avio    tori     ptak
N     horse/horses     kavalo  uma      kon
N     fish/fish        pesko   sakana   ryb
N     man/men          omo     otoko    muzh
N     woman/women      dona    onna     zhen
N     child/children   nino    kodomo   dit
N     boy/boys         ragazo  shonen   khlop
N     girl/girls       ragaza  shojo    dev
N     ball/balls       pala    tama     mich
N     car/cars         karo    kuruma   vuz
N     house/houses     kasa    ie       dom
N     tree/trees       arbo    kigi     drev
N     book/books       libro   hon      knig
N     apple/apples     melo    ringo    yabl
VT    sees/see         vide    miru     vid
VT    likes/like       ama     suku     lyub
VT    finds/find       trova   mitsukeru najd
VT    carries/carry    porta   hakobu   nes
VT    follows/follow   segue   ou       sled
VT    watches/watch    mira    nagameru smotr
VT    eats/eat         manja   taberu   yed
VT    holds/hold       tene    motsu    derzh
VI    runs/run         kore    hashiru  bezh
VI    sleeps/sleep     dorme   nemuru   spi
VI    sings/sing       kanta   utau     poy
VI    jumps/jump       salta   tobu     prig
P     near             prope   chika    bliz
P     under            sota    shita    pod
P     behind           trase   ushiro   za
P     with             kun     to       sa
ADV   today            oje     kyo      sevod
ADV   quickly          presto  hayaku   bistro
ADV   slowly           lento   yukkuri  pomal
"""


def _parse_lexicon(text):
    """-> {category: [(english_forms, {lang: word})]}; english_forms = (singular/3sg, plural/base)."""
    lex = {}
    for line in text.strip().splitlines():
        cat, en, xa, xb, xc = line.split()
        forms = tuple(en.split("/")) if "/" in en else (en, en)
        lex.setdefault(cat, []).append((forms, {"xa": xa, "xb": xb, "xc": xc}))
    return lex


LEXICON = _parse_lexicon(_LEXICON)


# ------------------------------------------------------------------------------------ generation

def _noun_phrase(rng, plural):
    dets = LEXICON["PDET"] + LEXICON["DET"][:1] if plural else LEXICON["DET"]  # [:1] = "the"
    return {"det": rng.choice(dets),
            "adj": rng.choice(LEXICON["ADJ"]) if rng.random() < 0.3 else None,
            "col": rng.choice(LEXICON["COL"]) if rng.random() < 0.3 else None,
            "noun": rng.choice(LEXICON["N"]), "plural": plural}


def _clause(rng):
    """An abstract sentence; every language renders it with its own rules."""
    kind = rng.random()
    transitive = kind < 0.55
    c = {"subj": _noun_phrase(rng, rng.random() < 0.4),
         "verb": rng.choice(LEXICON["VT" if transitive else "VI"]),
         "obj": _noun_phrase(rng, rng.random() < 0.4) if transitive else None,
         "prep": None, "pobj": None,
         "adv": rng.choice(LEXICON["ADV"]) if rng.random() < 0.3 else None}
    if rng.random() < 0.35:
        c["prep"] = rng.choice(LEXICON["P"])
        c["pobj"] = _noun_phrase(rng, rng.random() < 0.3)
    return c


def _np_words(np, lang):
    if lang == "en":
        words = [np["det"][0][0], np["adj"] and np["adj"][0][0], np["col"] and np["col"][0][0],
                 np["noun"][0][1 if np["plural"] else 0]]
        words = [w for w in words if w]
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return words
    det, noun = np["det"][1][lang], np["noun"][1][lang]
    adj = np["adj"] and np["adj"][1][lang]
    col = np["col"] and np["col"][1][lang]
    pl = np["plural"]
    if lang == "xa":  # adjectives follow the noun; plural particle right after it
        words = [det, noun, "li" if pl else None, adj, col]
    elif lang == "xb":  # English order, plural particle before the noun
        words = [det, adj, col, "mo" if pl else None, noun]
    else:  # xc: the whole phrase reversed, plural as a suffix
        words = [noun + "ek" if pl else noun, col, adj, det]
    return [w for w in words if w]


def render(c, lang):
    """The sentence `c` (from _clause) in `lang`, as one line of space-separated words."""
    subj, obj, pobj = (_np_words(c[k], lang) if c[k] else [] for k in ("subj", "obj", "pobj"))
    pl = c["subj"]["plural"]
    if lang == "en":
        verb = c["verb"][0][1 if pl else 0]
        prep, adv = c["prep"] and c["prep"][0][0], c["adv"] and c["adv"][0][0]
    else:
        verb = c["verb"][1][lang]
        prep, adv = c["prep"] and c["prep"][1][lang], c["adv"] and c["adv"][1][lang]
    pp = [prep] + pobj if prep else []
    if lang in ("en", "xa"):
        words = subj + [verb] + obj + pp + [adv]
    elif lang == "xb":  # SOV, object particle, postposition
        words = subj + (obj + ["wo"] if obj else []) + (pobj + [prep] if prep else []) + [adv, verb]
    else:  # xc: verb first, agreeing with a plural subject
        words = [verb + "at" if pl else verb] + subj + obj + pp + [adv]
    return " ".join(w for w in words if w)


def sentences(n, seed, min_len=3, max_len=10):
    """n distinct English sentences (3-10 words) with translations: [{lang: line}], seeded."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(200 * n + 1000):  # the grammar has millions of sentences; this never binds
        if len(out) == n:
            return out
        c = _clause(rng)
        en = render(c, "en")
        if en in seen or not min_len <= len(en.split()) <= max_len:
            continue
        seen.add(en)
        out.append({lang: render(c, lang) for lang in LANGS})
    raise DataPrepError(f"could not generate {n} distinct sentences of {min_len}-{max_len} words")


def generate(n_train=6000, n_valid=200, n_test=200, seed=1, out_dir="."):
    """Writes {out_dir}/{split}.{lang} for the 3 splits x 4 languages in one atomic step.

    Returns {(split, lang): path}. Same arguments -> byte-identical files.
    """
    for flag, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if n < 1:
            raise DataPrepError(f"{flag} must be >= 1 (got {n})")
    rows = sentences(n_train + n_valid + n_test, seed)
    # test and valid first: sizes of one split never change the sentences of another
    splits = {"test": rows[:n_test], "valid": rows[n_test:n_test + n_valid],
              "train": rows[n_test + n_valid:]}
    paths = {(s, lang): os.path.join(out_dir, f"{s}.{lang}") for s in splits for lang in LANGS}
    keys = list(paths)
    with atomic_outputs([paths[k] for k in keys]) as handles:
        for (split, lang), f in zip(keys, handles):
            f.write("".join(row[lang] + "\n" for row in splits[split]))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic_corpus",
                                description="Write the embedded synthetic corpus en -> xa, xb, xc "
                                            "as {out}/{split}.{lang} (no download).")
    p.add_argument("--out", required=True, help="output directory for the text files")
    p.add_argument("--train", type=int, default=6000, help="train sentences (6000)")
    p.add_argument("--valid", type=int, default=200, help="valid sentences (200)")
    p.add_argument("--test", type=int, default=200, help="test sentences (200)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    p.add_argument("--binarize", metavar="DATA_BIN",
                   help="also build a fairseq data-bin (en-xa, en-xb, en-xc; joint sentencepiece, "
                        "shared dictionary) with data_prep.pipeline")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="sentencepiece vocabulary for --binarize; an upper bound (1000)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"the directions --binarize builds, en-T for each T (default: {','.join(TARGETS)}; "
                        "one is faster: each direction is one fairseq-preprocess run)")
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
        p.error(f"--targets must list distinct languages of {','.join(TARGETS)} (got '{args.targets}')")
    try:
        generate(args.train, args.valid, args.test, args.seed, args.out)
        print(f"wrote {args.out}/{{train,valid,test}}.{{{','.join(LANGS)}}}", flush=True)
        if args.binarize:
            from data_prep import pipeline
            from data_prep.parallel_files import Pair
            raw = {split: [Pair("en", t, os.path.join(args.out, f"{split}.en"),
                                os.path.join(args.out, f"{split}.{t}")) for t in targets]
                   for split in pipeline.SPLITS}
            # No length/ratio filtering: the generator already bounds both. Word pieces: the
            # corpus has ~300 word types, and subword splits would only make it harder to learn.
            pipeline.run("synthetic", raw, args.binarize, vocab_size=args.vocab_size,
                         max_len=10_000, max_ratio=10_000, spm_model_type="word")
    except DataPrepError as e:
        sys.exit(f"synthetic_corpus: error: {e}")


if __name__ == "__main__":
    main()
