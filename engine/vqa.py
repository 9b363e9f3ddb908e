"""VQAv2's accuracy with its answer normalisation, written from the official evaluation's rules.

An answer scores min(#annotators who gave it / 3, 1), averaged over the ten
leave-one-annotator-out subsets of the ten human answers. Answers are
compared after the official normalisation: line breaks and tabs become spaces,
and, when the annotators disagree, both sides are normalised: punctuation
removed (or, between letters, replaced by a space; a comma between digits is
kept as is), periods not followed by a digit dropped, number words made digits,
articles dropped, unpunctuated contractions restored ("dont" -> "don't").

Two quirks of the official script are kept, so scores match it: when all ten
annotators agree, neither side is normalised (a generated "Yes." does not
match "yes"), and its period removal stops after 32 periods (a ``re.UNICODE``
passed as the count).
"""
from __future__ import annotations

import re

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")          # the official pattern, typo included
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The EvalAI / VQA table of contractions, as it applies to lower-cased words: each form below
# is restored from itself with one of its apostrophes left out (from itself without its only
# apostrophe); the table's capitalised keys ("Im", "Ive", "Id've", "I'dve") never match a
# lower-cased word, its "let's" and "she's" map to themselves, and its "somebody'd" maps to
# "somebodyd".
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't
she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in CONTRACTED:
        cuts = [i for i, c in enumerate(word) if c == "'"]
        for i in cuts:
            table[word[:i] + word[i + 1:] if len(cuts) > 1 else word.replace("'", "")] = word
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(answer: str, human_answers: list[str]) -> float:
    """VQAv2 accuracy of one answer given the annotators' answers."""
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    res, gts = clean(answer), [clean(a) for a in human_answers]
    if len(set(gts)) > 1:
        gts, res = [normalize(a) for a in gts], normalize(res)
    if not gts:
        return 0.0
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
