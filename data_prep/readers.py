"""Readers of the formats parallel corpora come in: plain text, .gz, .tsv, WMT .sgm, .tmx.

Each reader is a generator; a malformed or truncated file raises DataPrepError in one line that
names the file (and the line, where the format has lines). The format follows from the name,
after an optional `.gz`: `.tsv` (two tab-separated columns, one pair a line), `.sgm` (WMT SGML,
one `<seg id=..>` a line, one language a file), `.tmx` (XML translation memory, both languages
in one file), anything else plain text (one sentence a line).

`read_pair(pair)` yields the (source, target) sentences of a Pair: two one-language files are
read side by side and must have the same number of sentences; a .tsv or .tmx holds both sides
(Pair.tgt_path is then the same file, or empty).
"""

import gzip
import html
import re
import xml.etree.ElementTree as ET

from data_prep.parallel_files import DataPrepError, aligned, iter_lines

BILINGUAL = ("tsv", "tmx")  # one file holds both languages
_SEG = re.compile(r"<seg(?:\s[^>]*)?>(.*?)</seg>", re.IGNORECASE)
_SGM_SETS = ("srcset", "refset", "tstset")
# TMX inline elements that hold formatting codes, not text (their tails are text)
_TMX_CODES = {"bpt", "ept", "ph", "it", "ut"}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def file_format(path):
    """'plain', 'tsv', 'sgm' or 'tmx', from the name (an ending .gz is looked through)."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt in ("tsv", "sgm", "tmx"):
        if name.endswith("." + fmt):
            return fmt
    return "plain"


def read_sentences(path):
    """The sentences of a one-language file (plain, .gz or .sgm), in order."""
    fmt = file_format(path)
    if fmt == "sgm":
        return read_sgm(path)
    if fmt in BILINGUAL:
        raise DataPrepError(f"{path}: a .{fmt} file holds both languages; give it once, "
                            "not as one side of a pair")
    return iter_lines(path)


def read_sgm(path):
    """The text of each <seg> of a WMT SGML file (entities unescaped).

    WMT's files have one <seg> a line inside <srcset>/<refset>/<tstset>; a file that ends before
    the closing tag of its set is truncated, a <seg> without </seg> is malformed.
    """
    open_set, closed, n_segs = None, False, 0
    lineno = 0
    for lineno, line in enumerate(iter_lines(path), 1):
        low = line.lower()
        if open_set is None:
            for name in _SGM_SETS:
                if f"<{name}" in low:
                    open_set = name
        if "<seg" in low:
            m = _SEG.search(line)
            if m is None:
                raise DataPrepError(f"{path}: line {lineno}: <seg> without </seg> (malformed or "
                                    "truncated SGML)")
            n_segs += 1
            yield html.unescape(m.group(1))
        if open_set and f"</{open_set}>" in low:
            closed = True
    if open_set is None:
        raise DataPrepError(f"{path}: not WMT SGML (no <srcset>, <refset> or <tstset>)")
    if not closed:
        raise DataPrepError(f"{path}: truncated after line {lineno} ({n_segs} segments, "
                            f"no </{open_set}>)")


def read_tsv(path):
    """(column 1, column 2) of each line of a two-column tab-separated file."""
    for lineno, line in enumerate(iter_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataPrepError(f"{path}: line {lineno} has {len(fields)} tab-separated "
                                "field(s), expected 2 (source<TAB>target)")
        yield fields[0], fields[1]


def _lang_matches(code, lang):
    """TMX language codes come as en, EN, en-GB, en_US: compare the primary subtag."""
    return re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0] == lang.lower()


def _seg_text(seg):
    parts = [seg.text or ""]
    for child in seg:
        if child.tag not in _TMX_CODES:
            parts.append("".join(child.itertext()))
        parts.append(child.tail or "")
    return "".join(parts)


def read_tmx(path, src, tgt):
    """(src, tgt) of each <tu> that has a <tuv> in both languages (matched on xml:lang).

    iterparse reads it as a stream, and each <tu> is dropped once read.
    """
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    n_units = n_pairs = 0
    try:
        with opener(path, "rb") as f:
            parents = []  # the open elements: a finished <tu> is removed from its parent
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if event == "start":
                    parents.append(elem)
                    continue
                parents.pop()
                if elem.tag != "tu":
                    continue
                n_units += 1
                sides = {}
                for tuv in elem.iter("tuv"):
                    code = tuv.get(_XML_LANG) or tuv.get("lang") or ""
                    seg = tuv.find("seg")
                    for lang in (src, tgt):
                        if seg is not None and lang not in sides and _lang_matches(code, lang):
                            sides[lang] = _seg_text(seg)
                if parents:
                    parents[-1].remove(elem)  # memory stays flat on multi-GB files
                if len(sides) == 2:
                    n_pairs += 1
                    yield sides[src], sides[tgt]
    except ET.ParseError as e:
        line, col = e.position
        raise DataPrepError(f"{path}: malformed or truncated TMX at line {line}, column {col} "
                            f"({str(e).split(':')[0]})") from None
    except (OSError, EOFError) as e:  # a truncated .gz, an unreadable file
        raise DataPrepError(f"{path}: cannot read ({e})") from None
    if n_pairs == 0:
        raise DataPrepError(f"{path}: none of its {n_units} <tu> has both a {src} and a {tgt} "
                            "<tuv> (xml:lang)")


def read_pair(pair):
    """Yields (source, target) sentence pairs of a Pair, whatever its format."""
    fmt = file_format(pair.src_path)
    if fmt in BILINGUAL:
        if pair.tgt_path and pair.tgt_path != pair.src_path:
            raise DataPrepError(f"{pair.src_path}: a .{fmt} file holds both languages; give it "
                                f"alone, not with {pair.tgt_path}")
        if fmt == "tmx":  # its languages are named inside
            return read_tmx(pair.src_path, pair.src, pair.tgt)
        rows = read_tsv(pair.src_path)
        return ((b, a) for a, b in rows) if pair.swapped else rows
    if not pair.tgt_path:
        raise DataPrepError(f"{pair.src_path}: a one-language file needs its target-side file "
                            "too (give SRC_FILE,TGT_FILE)")
    return aligned(read_sentences(pair.src_path), read_sentences(pair.tgt_path),
                   pair.src_path, pair.tgt_path)
