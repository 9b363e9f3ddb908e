"""Caption scores: COCO's CIDEr-D and BLEU-4 (pycocoevalcap), after PTB tokenisation.

pycocoevalcap's scorers are pure Python, but its ``PTBTokenizer`` runs Stanford
CoreNLP's Java PTBTokenizer (``-preserveLines -lowerCase``) and then drops
punctuation tokens. ``ptb_tokenize`` does the same in Python: lower case;
punctuation split off words (a period stays on abbreviations such as "u.s.",
"p.m.", "mr."); clitics split ("isn't" -> "is n't", "cat's" -> "cat 's",
"cannot" -> "can not", "gonna" -> "gon na"); double quotes become `` and '',
an opening single quote `; brackets become -lrb- / -rrb- / -lsb- / ...; then
the same punctuation list as pycocoevalcap is removed. That list spells the
bracket tokens in upper case while the tokenizer emits them in lower case, so
"-lrb-" survives in both (a quirk kept for identical scores). Tested against
the Java tokenizer where Java is installed.

pycocoevalcap 1.2's ``Cider`` is CIDEr-D (clipped n-gram counts, Gaussian
length penalty, sigma 6, x10): the score COCO's leaderboard calls CIDEr. Its
document frequencies come from the evaluated set's references, so scores are
computed once, over all images, after every rank has finished. METEOR and
SPICE need Java and are skipped by name.
"""
from __future__ import annotations

import re

from utils.errors import V2LError

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}   # pycocoevalcap's list
SKIPPED = {"METEOR": "needs Java (pycocoevalcap runs meteor-1.5.jar)",
           "SPICE": "needs Java (pycocoevalcap runs spice-1.0.jar)"}

_OPEN = {'"': "``", "(": "-lrb-", "[": "-lsb-", "{": "-lcb-", "`": "`", "$": "$", "#": "#"}
_CLOSE = {'"': "''", ")": "-rrb-", "]": "-rsb-", "}": "-rcb-", ",": ",", ";": ";", ":": ":",
          "?": "?", "!": "!", "%": "%", "'": "'"}
_APOS_WORD = re.compile(r"'(em|tis|twas|n'?)(?![a-z])")   # words that begin with an apostrophe
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp",
           "mt", "ft", "no", "prof", "gen", "sgt", "capt", "lt", "col", "ave", "blvd", "rd",
           "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"],
                "gotta": ["got", "ta"], "gimme": ["gim", "me"], "lemme": ["lem", "me"],
                "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_INNER = re.compile(r"(\.\.\.|--)")


def _core(word: str) -> list[str]:
    """A word without surrounding punctuation -> its tokens (clitics split)."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    m = _CLITIC.match(word)
    if m and m.group(1) not in ("'", ""):
        return [m.group(1), m.group(2)]
    return [word]


def _chunk(chunk: str) -> list[str]:
    head, tail = [], []
    while chunk:
        if chunk.startswith(("...", "--")):
            head.append(chunk[:3] if chunk.startswith("...") else "--")
            chunk = chunk[len(head[-1]):]
        elif chunk[0] == "'" and not _APOS_WORD.match(chunk):
            head.append("`")
            chunk = chunk[1:]
        elif chunk[0] in _OPEN:
            head.append(_OPEN[chunk[0]])
            chunk = chunk[1:]
        else:
            break
    while chunk:
        if chunk.endswith(("...", "--")):
            n = 3 if chunk.endswith("...") else 2
            tail.insert(0, chunk[-n:])
            chunk = chunk[:-n]
        elif chunk[-1] == "." and not (("." in chunk[:-1] and re.search(r"[a-z]", chunk))
                                       or chunk[:-1] in _ABBREV):
            tail.insert(0, ".")
            chunk = chunk[:-1]
        elif chunk[-1] in _CLOSE and not (chunk[-1] == "'" and _APOS_WORD.fullmatch(chunk)):
            if chunk[-1] == "'" and (len(chunk) < 2 or chunk[-2] == "n"):   # "n'"/"'" kept
                break
            tail.insert(0, _CLOSE[chunk[-1]])
            chunk = chunk[:-1]
        else:
            break
    middle = []
    for part in _INNER.split(chunk) if chunk else []:
        if part in ("...", "--"):
            middle.append(part)
        elif part:
            middle += _core(part)
    return head + middle + tail


def ptb_tokenize(text: str) -> str:
    """PTB tokens of one caption, lower-cased, punctuation removed, joined by spaces."""
    tokens = [t for chunk in text.replace("\n", " ").lower().split() for t in _chunk(chunk)]
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def require_pycocoevalcap():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise V2LError(f"the caption scorer is not installed ({e}); pip install pycocoevalcap==1.2 "
                       "(pinned in requirements.txt)")
    return Bleu, Cider


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """CIDEr-D and BLEU-1..4 of predictions (key -> caption) against references (key -> list),
    both PTB-tokenised; also the per-key CIDEr-D. An empty prediction scores 0."""
    Bleu, Cider = require_pycocoevalcap()
    keys = sorted(predictions)
    res = {k: [ptb_tokenize(predictions[k])] for k in keys}
    gts = {k: [ptb_tokenize(r) for r in references[k]] for k in keys}
    cider, per_key = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr-D": float(cider), "BLEU-1": float(bleu[0]), "BLEU-4": float(bleu[3]),
            "per_key_cider": {k: float(c) for k, c in zip(keys, per_key)}}
