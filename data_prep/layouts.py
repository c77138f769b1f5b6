"""Where the files of a corpus are: released directory layouts and explicit file pairs.

Every function returns {split: [Pair(xx, "en", ...) or any Pair]} with fairseq's split names
(train, valid, test) and the project's language codes; the caller orients the pairs
(--directions). A missing file or directory is a one-line DataPrepError naming it.

- opus100: opus-100-corpus/v1.0/supervised/{a}-{b}/opus.{a}-{b}-{train,dev,test}.{a,b}
- flores:  flores200_dataset/{dev,devtest}/{code}.{dev,devtest}, codes like deu_Latn
           (evaluation only: dev -> valid, devtest -> test)
- mtdata:  what `mtdata get -l xxx-eng ... --merge -o DIR` writes: DIR/train.{xxx,eng}[.gz],
           DIR/dev.{..}, DIR/test1.{..} (or DIR/train-parts/*.{..} unmerged), ISO 639-3 codes;
           DIR may also hold one such directory per language pair
- pairs:   SPLIT:SRC-TGT:FILE[,FILE] on the command line
"""

import glob
import os
import re

from data_prep.parallel_files import DataPrepError, Pair, parse_direction
from data_prep.readers import BILINGUAL, file_format

SPLIT_NAMES = {"train": "train", "valid": "valid", "dev": "valid", "test": "test",
               "devtest": "test"}

# FLORES-200 code -> the project's (ISO 639-1) code, for the WMT-10 and common OPUS-100
# languages; --lang-map adds or overrides entries.
FLORES_CODES = {
    "eng_Latn": "en", "fra_Latn": "fr", "ces_Latn": "cs", "deu_Latn": "de", "fin_Latn": "fi",
    "lvs_Latn": "lv", "est_Latn": "et", "ron_Latn": "ro", "hin_Deva": "hi", "tur_Latn": "tr",
    "guj_Gujr": "gu", "spa_Latn": "es", "ita_Latn": "it", "por_Latn": "pt", "nld_Latn": "nl",
    "pol_Latn": "pl", "rus_Cyrl": "ru", "ukr_Cyrl": "uk", "bul_Cyrl": "bg", "ell_Grek": "el",
    "hun_Latn": "hu", "swe_Latn": "sv", "dan_Latn": "da", "lit_Latn": "lt", "slk_Latn": "sk",
    "slv_Latn": "sl", "hrv_Latn": "hr", "arb_Arab": "ar", "heb_Hebr": "he", "pes_Arab": "fa",
    "zho_Hans": "zh", "jpn_Jpan": "ja", "kor_Hang": "ko", "vie_Latn": "vi", "tha_Thai": "th",
    "ind_Latn": "id", "ben_Beng": "bn", "tam_Taml": "ta", "urd_Arab": "ur", "swh_Latn": "sw",
}
# ISO 639-3 (mtdata's file suffixes) -> the project's code
ISO3_CODES = {
    "eng": "en", "fra": "fr", "ces": "cs", "deu": "de", "fin": "fi", "lav": "lv", "est": "et",
    "ron": "ro", "hin": "hi", "tur": "tr", "guj": "gu", "spa": "es", "ita": "it", "por": "pt",
    "nld": "nl", "pol": "pl", "rus": "ru", "ukr": "uk", "bul": "bg", "ell": "el", "hun": "hu",
    "swe": "sv", "dan": "da", "lit": "lt", "slk": "sk", "slv": "sl", "hrv": "hr", "ara": "ar",
    "heb": "he", "fas": "fa", "zho": "zh", "jpn": "ja", "kor": "ko", "vie": "vi", "tha": "th",
    "ind": "id", "ben": "bn", "tam": "ta", "urd": "ur", "swa": "sw",
}


def parse_lang_map(text):
    """'deu_Latn=de,lvs_Latn=lv' -> {'deu_Latn': 'de', 'lvs_Latn': 'lv'}."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        code, sep, ours = item.partition("=")
        if not sep or not code or not ours or "-" in ours or "." in ours:
            raise DataPrepError(f"--lang-map: '{item}' is not like deu_Latn=de")
        out[code] = ours
    return out


def _want(lang, langs):
    return langs is None or lang in langs


# ------------------------------------------------------------------------------------ opus100

def _opus_supervised_dir(root):
    for cand in (root, os.path.join(root, "supervised"), os.path.join(root, "v1.0", "supervised"),
                 os.path.join(root, "opus-100-corpus", "v1.0", "supervised")):
        if glob.glob(os.path.join(cand, "*-*", "opus.*-*-train.*")):
            return cand
    raise DataPrepError(f"--layout opus100: {root} holds no opus-100-corpus/v1.0/supervised/"
                        "{xx}-en/opus.{xx}-en-train.{xx} (point it at the tree top or at "
                        "supervised/)")


def opus100(root, langs=None):
    """OPUS-100's English-centric supervised pairs; langs limits the non-English languages."""
    sup = _opus_supervised_dir(root)
    out = {"train": [], "valid": [], "test": []}
    for pair_dir in sorted(os.listdir(sup)):
        m = re.fullmatch(r"([a-z_]+)-([a-z_]+)", pair_dir)
        if not m or "en" not in m.groups():
            continue
        a, b = m.groups()
        xx = b if a == "en" else a
        if not _want(xx, langs):
            continue
        for split, ours in (("train", "train"), ("dev", "valid"), ("test", "test")):
            paths = [os.path.join(sup, pair_dir, f"opus.{pair_dir}-{split}.{lang}")
                     for lang in (xx, "en")]
            have = [os.path.isfile(p) for p in paths]
            if all(have):
                out[ours].append(Pair(xx, "en", *paths))
            elif any(have) or split == "train":
                missing = paths[have.index(False)]
                raise DataPrepError(f"--layout opus100: {missing} is missing")
    _check_found("opus100", root, out, langs)
    return out


def _check_found(layout, root, out, langs):
    found = {p.src for pairs in out.values() for p in pairs} | \
            {p.tgt for pairs in out.values() for p in pairs}
    if not any(out.values()):
        raise DataPrepError(f"--layout {layout}: no pair found in {root}"
                            + (f" for --langs {','.join(sorted(langs))}" if langs else ""))
    if langs:
        missing = sorted(set(langs) - found)
        if missing:
            raise DataPrepError(f"--langs: {','.join(missing)} not found in {layout} {root}")


# ------------------------------------------------------------------------------------- flores

def flores(root, langs=None, lang_map=None, pivot="en"):
    """FLORES dev/devtest as valid/test pairs xx-en (multi-way parallel: line i of every file is
    the same sentence). Codes map through FLORES_CODES and lang_map."""
    codes = dict(FLORES_CODES, **(lang_map or {}))
    top = root if os.path.isdir(os.path.join(root, "devtest")) else \
        os.path.join(root, "flores200_dataset")
    if not os.path.isdir(os.path.join(top, "devtest")):
        raise DataPrepError(f"--layout flores: {root} has no devtest/ (nor "
                            "flores200_dataset/devtest/)")
    files = {}
    for split in ("dev", "devtest"):
        for path in sorted(glob.glob(os.path.join(top, split, f"*.{split}"))):
            code = os.path.basename(path)[:-len(split) - 1]
            files.setdefault(split, {})[code] = path
    by_ours = {}
    for code in files.get("devtest", {}):
        if code in codes:
            by_ours.setdefault(codes[code], code)
    pivot_code = next((c for c, ours in codes.items() if ours == pivot and
                       c in files.get("devtest", {})), None)
    if pivot_code is None:
        raise DataPrepError(f"--layout flores: no {pivot} file in {top}/devtest (expected "
                            "eng_Latn.devtest, or map its code with --lang-map CODE=en)")
    unknown_wanted = sorted(set(langs or ()) - set(by_ours))
    if unknown_wanted:
        raise DataPrepError(f"--langs: {','.join(unknown_wanted)} has no FLORES file in {top} "
                            "(map FLORES codes to yours with --lang-map deu_Latn=de,...)")
    out = {"valid": [], "test": []}
    for ours, code in sorted(by_ours.items()):
        if ours == pivot or not _want(ours, langs):
            continue
        for split, fairseq_split in (("dev", "valid"), ("devtest", "test")):
            if code in files.get(split, {}) and pivot_code in files[split]:
                out[fairseq_split].append(Pair(ours, pivot, files[split][code],
                                               files[split][pivot_code]))
    _check_found("flores", root, out, langs)
    return out


# ------------------------------------------------------------------------------------- mtdata

def _mtdata_pair_dirs(root):
    def is_pair_dir(d):
        return bool(glob.glob(os.path.join(d, "train.*")) or
                    os.path.isdir(os.path.join(d, "train-parts")) or
                    glob.glob(os.path.join(d, "dev.*")))
    if is_pair_dir(root):
        return [root]
    dirs = [os.path.join(root, d) for d in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, d)) and is_pair_dir(os.path.join(root, d))] \
        if os.path.isdir(root) else []
    if not dirs:
        raise DataPrepError(f"--layout mtdata: {root} holds no `mtdata get` output (train.*, "
                            "train-parts/ or dev.*), nor directories that do")
    return dirs


def _lang_files(d, stem):
    """{iso3 code: path} of d/{stem}.{code}[.gz] (mtdata's meta and stats files left out)."""
    out = {}
    for path in glob.glob(os.path.join(d, f"{stem}.*")):
        suffix = os.path.basename(path)[len(stem) + 1:]
        code = suffix[:-3] if suffix.endswith(".gz") else suffix
        if re.fullmatch(r"[a-z]{2,3}(_[A-Za-z]+)?", code):
            out[code] = path
    return out


def mtdata(root, langs=None, lang_map=None, pivot="en"):
    """Pairs xx-en from one or several `mtdata get` output directories."""
    codes = dict(ISO3_CODES, **(lang_map or {}))
    out = {"train": [], "valid": [], "test": []}
    for d in _mtdata_pair_dirs(root):
        for split, stems in (("train", ("train",)), ("valid", ("dev",)), ("test", ("test", "test1"))):
            files = next((f for f in (_lang_files(d, s) for s in stems) if len(f) == 2), None)
            if files is None and split == "train" and os.path.isdir(os.path.join(d, "train-parts")):
                out[split] += _mtdata_parts(d, codes, pivot)
                continue
            if files is None:
                continue
            pair = _orient(d, files, codes, pivot)
            if pair and _want(pair.src, langs):
                out[split].append(pair)
    out["train"] = [p for p in out["train"] if _want(p.src, langs)]
    _check_found("mtdata", root, out, langs)
    return out


def _to_ours(d, code, codes):
    if code in codes:
        return codes[code]
    if len(code) == 2:
        return code
    raise DataPrepError(f"--layout mtdata: {d}: language code '{code}' is not in the table; "
                        f"map it with --lang-map {code}=xx")


def _orient(d, files, codes, pivot):
    (c1, p1), (c2, p2) = sorted(files.items())
    l1, l2 = _to_ours(d, c1, codes), _to_ours(d, c2, codes)
    if pivot not in (l1, l2):
        raise DataPrepError(f"--layout mtdata: {d} pairs {l1} with {l2}; only pairs with "
                            f"{pivot} are supported")
    return Pair(l1, l2, p1, p2) if l2 == pivot else Pair(l2, l1, p2, p1)


def _mtdata_parts(d, codes, pivot):
    """Unmerged train: train-parts/{dataset id}.{code} pairs, one Pair per dataset."""
    parts = os.path.join(d, "train-parts")
    stems = {}
    for path in sorted(glob.glob(os.path.join(parts, "*.*"))):
        name = os.path.basename(path)
        if ".meta." in name or name.startswith("."):
            continue
        stem, _, code = (name[:-3] if name.endswith(".gz") else name).rpartition(".")
        stems.setdefault(stem, {})[code] = path
    return [_orient(parts, files, codes, pivot) for stem, files in sorted(stems.items())
            if len(files) == 2]


# -------------------------------------------------------------------------------------- pairs

def parse_pairs(specs):
    """['train:de-en:a.de,a.en', 'test:de-en:x.tsv'] -> {split: [Pair]}.

    SPLIT is train, valid (or dev) or test; FILE is two one-language files (plain, .gz, .sgm)
    or one two-language file (.tsv with SRC<TAB>TGT columns, .tmx).
    """
    out = {}
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[0] not in SPLIT_NAMES:
            raise DataPrepError(f"--pairs: '{spec}' is not like SPLIT:SRC-TGT:FILE[,FILE] with "
                                f"SPLIT one of train, valid, test")
        split, direction, files = parts
        src, tgt = parse_direction(direction, "--pairs")
        paths = files.split(",")
        if len(paths) == 1 and file_format(paths[0]) in BILINGUAL:
            pair = Pair(src, tgt, paths[0], paths[0])
        elif len(paths) == 2 and all(paths):
            pair = Pair(src, tgt, *paths)
        else:
            raise DataPrepError(f"--pairs: '{spec}': give SRC_FILE,TGT_FILE, or one .tsv/.tmx file")
        for path in dict.fromkeys((pair.src_path, pair.tgt_path)):
            if not os.path.isfile(path):
                raise DataPrepError(f"--pairs: {path}: no such file")
        out.setdefault(SPLIT_NAMES[split], []).append(pair)
    return out
