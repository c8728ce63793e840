"""STOP-style spoken-form text normalisation, applied consistently to an utterance and its tree.

STOP's ``normalized_utterance`` is the TOPv2 text as it is spoken: lower case, no punctuation,
numbers, times, dates, ordinals, currencies and percentages written out in words. The logical
form over those words (``normalized_seqlogical``) must use exactly the same words, so that the
slot words of the decoupled form are copies, in order, of the transcript words.

Rules (chosen to be STOP-like and applied the same way everywhere):

=====================  ===========================================================
``7:30`` / ``7.30``     seven thirty      ``7:05`` seven oh five   ``7:00`` seven o'clock
``7:00 am`` ``7am``     seven am          ``10:30pm`` ten thirty pm  ``615am`` six fifteen am
``a.m.`` ``P.M.``       am / pm           ``17:00`` seventeen hundred
``1st`` ``22nd``        first / twenty second
``2019`` (4 digits)     twenty nineteen   ``2005`` two thousand five  ``1500`` fifteen hundred
``0830``                oh eight thirty   5+ digits (zip codes, ids): digit by digit
``3/15`` ``3/15/2019``  march fifteenth [twenty nineteen]; ``1/2`` one half
``May 15``              may fifteenth     ``May 15-17`` may fifteenth to seventeenth
``$5`` ``$5.50``        five dollars / five dollars and fifty cents; ``$0.50`` fifty cents
``20%``                 twenty percent    ``2.5`` two point five
``70°`` ``70°F``        seventy degrees / seventy degrees fahrenheit (``100F`` likewise)
``80s`` ``1980's``      eighties / nineteen eighties
``8-10``                eight to ten      ``I-95`` i ninety five   ``#1`` number one
``&`` ``+`` ``@``       and / plus / at
``what's`` ``don't``    kept (in-word apostrophes, curly ones made straight)
``wake-up``             wake up (hyphens and other punctuation separate words or vanish)
``Dr.`` ``St.``         doctor; saint before a capitalised word, else street
=====================  ===========================================================

Cardinals are written without "and": 123 -> "one hundred twenty three".

Tree consistency: in TOPv2 the tree's word tokens concatenated equal the utterance with its
spaces removed (the tree only splits off punctuation and clitics: ``is it ? ]`` for ``is it?``).
:func:`normalize_example` normalises the *utterance* once, keeping for every output word the
characters it came from, and gives each word to the tree token holding its first letter or digit.
So a token that becomes several words becomes several words in the tree, tokens that normalise
to nothing disappear, and the normalised tree's words joined always equal the normalised
utterance. When a tree's tokens do not spell the utterance (hand-made data), each tree token is
normalised on its own and the example records whether the two still agree.
"""

from __future__ import annotations

import contextvars
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from conslu.logical_form import Tree, decouple, parse_tree, words as tree_words

__all__ = [
    "NormalizedExample",
    "normalize_text",
    "normalize_words",
    "normalize_example",
    "cardinal",
    "ordinal",
    "year_words",
    "is_subsequence",
    "digit_string",
    "rule_counts",
]

# rule firing counts of the running rule_counts() call (None: not counting)
_FIRED: "contextvars.ContextVar[Optional[Counter[str]]]" = contextvars.ContextVar("conslu_rules", default=None)


def _fire(rule: str) -> None:
    counts = _FIRED.get()
    if counts is not None:
        counts[rule] += 1


def rule_counts(texts: Iterable[str]) -> "Counter[str]":
    """How often each rule fires over ``texts`` (one count per rewritten item; plain words are
    not counted). ``conslu normalize --report`` prints this over TOPv2 files."""
    counts: Counter[str] = Counter()
    token = _FIRED.set(counts)
    try:
        for text in texts:
            normalize_spans(text)
    finally:
        _FIRED.reset(token)
    return counts

# ----------------------------------------------------------------------------------- numbers
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand")]
_ORD_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_DIGIT_WORDS = _ONES[:10]


def _below_thousand(n: int) -> list[str]:
    out: list[str] = []
    if n >= 100:
        out += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        out.append(_TENS[n // 10])
        if n % 10:
            out.append(_ONES[n % 10])
    elif n or not out:
        out.append(_ONES[n])
    return out


def cardinal(n: int) -> str:
    """123 -> "one hundred twenty three" (no "and"); negative numbers get "minus"."""
    if n < 0:
        return "minus " + cardinal(-n)
    if n >= 10 ** 15:
        return " ".join(_DIGIT_WORDS[int(d)] for d in str(n))
    out: list[str] = []
    for value, name in _SCALES:
        if n >= value:
            out += _below_thousand(n // value) + [name]
            n %= value
    if n or not out:
        out += _below_thousand(n)
    return " ".join(out)


def _ordinal_word(word: str) -> str:
    if word in _ORD_IRREGULAR:
        return _ORD_IRREGULAR[word]
    if word.endswith("y"):
        return word[:-1] + "ieth"
    return word + "th"


def ordinal(n: int) -> str:
    """22 -> "twenty second"."""
    parts = cardinal(n).split()
    parts[-1] = _ordinal_word(parts[-1])
    return " ".join(parts)


def year_words(n: int) -> str:
    """Four-digit numbers read as years, the way STOP writes them: 2000-2099 as numbers (2018
    two thousand eighteen), other centuries in pairs (1999 nineteen ninety nine, 1905 nineteen oh
    five, 1900 nineteen hundred)."""
    if 2000 <= n <= 2099:
        _fire("year_two_thousand")
        return cardinal(n)
    return _year_pairs(n)


def _year_pairs(n: int) -> str:
    """2019 twenty nineteen (decades: the 2010s, twenty tens)."""
    if not 1000 <= n <= 9999:
        return cardinal(n)
    hi, lo = divmod(n, 100)
    if n % 1000 == 0 or (hi % 10 == 0 and lo < 10):   # 2000, 2005, 1007
        return cardinal(n)
    if lo == 0:
        return cardinal(hi) + " hundred"
    if lo < 10:
        return cardinal(hi) + " oh " + _ONES[lo]
    return cardinal(hi) + " " + cardinal(lo)


def _digits(s: str) -> str:
    """Digits after a decimal point: 2.05 two point zero five."""
    return " ".join(_DIGIT_WORDS[int(d)] for d in s)


def digit_string(s: str) -> str:
    """A digit string read digit by digit, zero as "oh": 0900 oh nine oh oh, 607 six oh seven."""
    _fire("digit_string")
    return " ".join("oh" if d == "0" else _DIGIT_WORDS[int(d)] for d in s if d.isdigit())


def _integer(s: str) -> str:
    """An integer written without separators, read the way it is usually spoken."""
    if len(s) > 1 and s[0] == "0":                      # 0900 oh nine oh oh
        return digit_string(s)
    if len(s) >= 5 and not s.endswith("000"):           # zip codes, ids (but 10000 is a number)
        return digit_string(s)
    n = int(s)
    if len(s) == 4:
        return year_words(n)
    return cardinal(n)


def _decimal(whole: str, frac: str) -> str:
    return _integer_plain(whole) + " point " + _digits(frac)


def _integer_plain(s: str) -> str:
    s = s.replace(",", "")
    return cardinal(int(s)) if s else "zero"


def _minutes(m: int, zero: str) -> str:
    if m == 0:
        return zero
    if m < 10:
        return "oh " + _ONES[m]
    return cardinal(m)


def _time(h: int, m: int, ampm: bool) -> str:
    hour = cardinal(h if h or not ampm else 12)
    if m == 0:
        if ampm or 1 <= h <= 12:                        # 7:00 seven (o'clock only where written)
            if not ampm:
                _fire("time_on_the_hour")
            return hour
        return hour + " hundred"                        # 17:00 seventeen hundred
    return hour + " " + _minutes(m, "")


_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december"]
_MONTH_ABBR = {m[:3]: m for m in _MONTHS}
_MONTH_ABBR["sept"] = "september"
_FRACTIONS = {2: ("half", "halves"), 3: ("third", "thirds"), 4: ("quarter", "quarters")}
# after a number ("mins" stays "mins" in STOP)
_UNIT_WORDS = {"hr": "hour", "hrs": "hours", "sec": "second", "secs": "seconds", "oz": "ounces"}
_ABBREVIATIONS = {"dr": "doctor", "mr": "mister", "mrs": "missus", "ave": "avenue",
                  "blvd": "boulevard", "hwy": "highway", "mt": "mount", "ft": "fort",
                  "jr": "junior", "sr": "senior", "vs": "versus", "apt": "apartment",
                  "etc": "etcetera", "rd": "road", "sept": "september"}
# spelled out with or without a full stop (other abbreviations need the stop: "dr" may be "drive")
_BARE_ABBREVIATIONS = frozenset({"rd", "blvd", "hwy", "sept", "ave", "st"})
# every abbreviation spelled out after a full stop ("st." is street or saint by the next word)
_STOP_ABBREVIATIONS = "|".join(sorted({*_ABBREVIATIONS, "st"}, key=lambda w: (-len(w), w)))
_INFORMAL = {"tonite": "tonight", "nite": "night", "2nite": "tonight"}
_STATES = {"AL": "alabama", "AK": "alaska", "AZ": "arizona", "AR": "arkansas", "CA": "california",
           "CO": "colorado", "CT": "connecticut", "DE": "delaware", "FL": "florida", "GA": "georgia",
           "HI": "hawaii", "ID": "idaho", "IL": "illinois", "IN": "indiana", "IA": "iowa", "KS": "kansas",
           "KY": "kentucky", "LA": "louisiana", "ME": "maine", "MD": "maryland", "MA": "massachusetts",
           "MI": "michigan", "MN": "minnesota", "MS": "mississippi", "MO": "missouri", "MT": "montana",
           "NE": "nebraska", "NV": "nevada", "NH": "new hampshire", "NJ": "new jersey", "NM": "new mexico",
           "NY": "new york", "NC": "north carolina", "ND": "north dakota", "OH": "ohio", "OK": "oklahoma",
           "OR": "oregon", "PA": "pennsylvania", "RI": "rhode island", "SC": "south carolina",
           "SD": "south dakota", "TN": "tennessee", "TX": "texas", "UT": "utah", "VT": "vermont",
           "VA": "virginia", "WA": "washington", "WV": "west virginia", "WI": "wisconsin", "WY": "wyoming"}
# codes that are also English words (or a city): spelled out as a state only after "City," or "City"
_STATE_WORDS = {"IN", "ME", "OR", "OK", "HI", "OH", "DE", "ID", "AL", "MS", "MT", "NE", "AR", "LA"}
_CITIES = {"LA": "los angeles", "NY": "new york", "NYC": "new york city"}
# words after which a number is a road, a route or a code, read digit by digit
_CODE_BEFORE = {"highway", "hwy", "route", "rte", "interstate", "i", "us", "sr", "exit", "freeway", "code",
                "room", "suite", "flight", "gate", "apartment", "apt", "unit", "extension", "ext"}
_CODE_AFTER = {"freeway", "fwy", "highway", "expressway", "interstate", "turnpike"}
_SYMBOLS = {"&": "and", "+": "plus", "@": "at", "%": "percent", "=": "equals", "°": "degrees"}

# --------------------------------------------------------------------------------- scanning
Span = tuple[str, int, int]          # (normalised word(s), start, end) in the source text
_Handler = Callable[["re.Match[str]", str], Optional[list[Span]]]

_AP = r"(?P<ap>[ap])\.?\s?m\b\.?"
_LETTER = r"[^\W\d_]"
_APOS = r"['’‘`]"


def _ampm(m: "re.Match[str]", group: str = "ap") -> list[Span]:
    return [(m.group(group).lower() + "m", m.start(group), m.end())]


def _h_time(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    h, mi = int(m.group("h")), int(m.group("m"))
    ap = m.group("ap") or m.group("ap1")
    if h > 24 or mi > 59:
        return None
    if m.group("sep") == "." and not ap and h > 12:
        return None                                     # 17.50 is more likely a decimal
    out = [(_time(h, mi, bool(ap)), m.start(), m.end("m"))]
    if m.group("ap"):
        out += _ampm(m)
    elif m.group("ap1"):
        out.append((m.group("ap1").lower() + "m", m.start("ap1"), m.end()))
    return out


def _h_hour_ampm(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    d = m.group("d")
    if len(d) <= 2:
        h, mi = int(d), 0
    else:
        h, mi = int(d[:-2]), int(d[-2:])
    if h > 24 or mi > 59:
        return None
    out = [(_time(h, mi, True), m.start("d"), m.end("d"))]
    if m.group("ap"):
        out += _ampm(m)
    else:
        out.append((m.group("ap1").lower() + "m", m.start("ap1"), m.end()))
    return out


def _h_ordinal(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    return [(ordinal(int(m.group("n"))), m.start(), m.end())]


def _h_decade(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    d = m.group("n")
    base = _year_pairs(int(d)) if len(d) == 4 else cardinal(int(d))
    parts = base.split()
    parts[-1] = parts[-1][:-1] + "ies" if parts[-1].endswith("y") else parts[-1] + "s"
    return [(" ".join(parts), m.start(), m.end())]


def _date(month: int, day: int, year: Optional[str]) -> str:
    out = _MONTHS[month - 1] + " " + ordinal(day)
    if year:
        out += " " + (_integer(year) if len(year) == 4 else _integer(year) if year[0] != "0"
                      else "oh " + _ONES[int(year[1])])
    return out


def _h_slash(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    a, b, y = int(m.group("a")), int(m.group("b")), m.group("y")
    whole = m.start(), m.end()
    if y is None and (a, b) == (24, 7):
        return None                                      # "24/7": twenty four slash seven
    if y is None and 0 < a < b and b in _FRACTIONS:
        frac = _FRACTIONS[b][0 if a == 1 else 1]
        return [(cardinal(a) + " " + frac, *whole)]
    if 1 <= a <= 12 and 1 <= b <= 31:
        return [(_date(a, b, y), *whole)]
    if 1 <= b <= 12 and 13 <= a <= 31:                 # day/month
        return [(_date(b, a, y), *whole)]
    return None                                          # read the numbers one by one


def _h_percent(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    num = _decimal(m.group("w"), m.group("f")) if m.group("f") else _integer_plain(m.group("w"))
    return [(num, m.start("w"), m.end("num")), ("percent", m.start("pct"), m.end())]


def _h_degrees(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    num = _decimal(m.group("w"), m.group("f")) if m.group("f") else _integer_plain(m.group("w"))
    out = num + " degrees"
    unit = (m.group("u") or m.group("u2") or "").upper()
    if unit:
        out += " fahrenheit" if unit == "F" else " celsius"
    return [(out, m.start(), m.end())]


def _h_range(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    a, b = m.group("a"), m.group("b")
    if len(a) > 3 or len(b) > 3 or int(a) >= int(b):
        return None
    return [(_integer(a), m.start("a"), m.end("a")), ("to", m.start("dash"), m.end("dash")),
            (_integer(b), m.start("b"), m.end("b"))]


def _h_commas(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    w = m.group("w")
    out = _decimal(w, m.group("f")) if m.group("f") else _integer_plain(w)
    return [(out, m.start(), m.end())]


def _h_decimal(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    return [(_decimal(m.group("w"), m.group("f")), m.start(), m.end())]


_PREV_WORD = re.compile(r"([^\W\d_]+)[\s#-]*$")
_NEXT_WORD = re.compile(r"[\s-]*([^\W\d_]+)")


def _h_integer(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    s = m.group()
    if len(s) == 3:                                     # the 101 freeway, route 280, room 607
        prev = _PREV_WORD.search(text, 0, m.start())
        nxt = _NEXT_WORD.match(text, m.end())
        if (prev and prev.group(1).lower() in _CODE_BEFORE) or (nxt and nxt.group(1).lower() in _CODE_AFTER):
            return [(digit_string(s), m.start(), m.end())]
    return [(_integer(s), m.start(), m.end())]


def _h_phone(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    return [(digit_string(m.group()), m.start(), m.end())]


_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
             "€": ("euro", "euros", "cent", "cents")}
_MULTIPLIERS = {"k": "thousand", "thousand": "thousand", "m": "million", "million": "million",
                "mm": "million", "bn": "billion", "b": "billion", "billion": "billion"}


def _h_currency(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    one, many, sub_one, sub_many = _CURRENCY[m.group("cur")]
    whole = int(m.group("w").replace(",", ""))
    frac = m.group("f")
    mult = m.group("mult")
    if mult:
        num = _decimal(m.group("w"), frac) if frac else cardinal(whole)
        out = f"{num} {_MULTIPLIERS[mult.lower()]} {many}"
    else:
        cents = int((frac + "0")[:2]) if frac else 0
        parts = []
        if whole or not cents:
            parts.append(f"{cardinal(whole)} {one if whole == 1 else many}")
        if cents:
            parts.append(f"{cardinal(cents)} {sub_one if cents == 1 else sub_many}")
        out = " and ".join(parts)
    return [(out, m.start(), m.end())]


def _h_ampm_abbr(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    return [(m.group("ap").lower() + "m", m.start(), m.end())]


def _h_initialism(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    letters = [c.lower() for c in m.group() if c.isalpha()]
    return [(" ".join(letters), m.start(), m.end())]


def _street_or_saint(text: str, end: int) -> str:
    nxt = re.match(r"[\s.]*([^\W\d_])", text[end:])
    return "saint" if nxt and nxt.group(1).isupper() else "street"


def _h_abbrev(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    word = m.group("w").lower()
    full = _street_or_saint(text, m.end()) if word == "st" else _ABBREVIATIONS[word]
    return [(full, m.start(), m.end())]


def _h_letters_digits(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    """Names of letters and a number, joined: U2 utwo, PS4 psfour (not I95: a road)."""
    letters = m.group("l")
    if letters.lower() == "i" or (m.start() and text[m.start() - 1].isalnum()):
        return None
    return [(letters.lower() + cardinal(int(m.group("d"))).replace(" ", ""), m.start(), m.end())]


def _h_month_day(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    name = m.group("mon").lower()
    month = name if name in _MONTHS else _MONTH_ABBR.get(name)
    if month is None:
        return None
    day = int(m.group("d"))
    if not 1 <= day <= 31:
        return None
    out = [(month, m.start("mon"), m.end("mon")), (ordinal(day), m.start("d"), m.end("d"))]
    if m.group("d2"):
        d2 = int(m.group("d2"))
        if not day < d2 <= 31:
            return None
        out += [("to", m.start("dash"), m.end("dash")), (ordinal(d2), m.start("d2"), m.end("d2"))]
    return out


def _word(w: str) -> str:
    return re.sub(r"['’‘`]|â€™", "'", w).lower()


def _mostly_upper(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) > 3 and sum(c.isupper() for c in letters) > 0.6 * len(letters)


_PLACE_PREPOSITIONS = {"in", "to", "from", "near", "of", "at", "around", "outside", "into", "for"}


def _place(raw: str, text: str, start: int) -> Optional[str]:
    """A US state or city code (``Miami, FL``, ``Austin TX``, ``in LA``) spelled out, else None."""
    if raw not in _STATES and raw not in _CITIES:
        return None
    prev = re.search(r"([^\W\d_]+)(\s*,)?\s*$", text[:start])
    if prev and prev.group(2):                          # "Naples, FL"
        return _STATES.get(raw) or _CITIES[raw]
    if _mostly_upper(text):
        return None
    first = prev is not None and not text[:prev.start()].strip()
    if prev and prev.group(1)[0].isupper() and not first and raw in _STATES:   # "Austin TX"
        return _STATES[raw]
    if raw in _CITIES:
        return _CITIES[raw]
    if raw not in _STATE_WORDS or (prev and prev.group(1).lower() in _PLACE_PREPOSITIONS):
        return _STATES[raw]
    return None


def _h_word(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    raw = m.group()
    w = _word(raw)
    start, end = m.start(), m.end()
    if w in _UNIT_WORDS and re.search(r"\d\s?$", text[:start]):
        _fire("unit")
        w = _UNIT_WORDS[w]
        number = re.search(r"(\d+)\s?$", text[:start])
        if w.endswith("s") and number and int(number.group(1)) == 1:
            w = w[:-1]
        elif not w.endswith("s") and number and int(number.group(1)) != 1:
            w += "s"
        return [(w, start, end)]
    if w in _INFORMAL:
        _fire("informal_spelling")
        return [(_INFORMAL[w], start, end)]
    if w in _BARE_ABBREVIATIONS and not raw.isupper():
        _fire("abbreviation")
        full = _street_or_saint(text, end) if w == "st" else _ABBREVIATIONS[w]
        return [(full, start, end)]
    clitic: list[Span] = []
    if len(w) > 2 and w.endswith("'s"):                 # TOP-style clitic: she's -> she 's
        _fire("clitic_s")
        apos = end - 1 - (3 if raw[:-1].endswith("â€™") else 1)
        raw, w, end, clitic = raw[: apos - start], w[:-2], apos, [("'s", apos, m.end())]
    place = _place(raw, text, start) if raw.isupper() and len(raw) <= 3 else None
    if place is not None:
        _fire("city_code" if raw in _CITIES and place == _CITIES[raw] else "state_code")
        w = place
    return [(w, start, end)] + clitic


def _h_hash(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    if m.start() > 0 and text[m.start() - 1].isalpha():
        return [("sharp", m.start(), m.end())]
    if re.match(r"\s?\d", text[m.end():]):
        return [("number", m.start(), m.end())]
    return None


def _h_symbol(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    return [(_SYMBOLS[m.group()], m.start(), m.end())]


def _h_slash_word(m: "re.Match[str]", text: str) -> Optional[list[Span]]:
    """``/`` between two words or numbers (``high/low``, ``24/7``): slash; elsewhere dropped."""
    i = m.start()
    if 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
        return [("slash", i, m.end())]
    return None


_I = re.IGNORECASE
_DIGIT_RULES: list[tuple["re.Pattern[str]", _Handler]] = [
    (re.compile(r"(?:\d{3}[-.])?\d{3}-\d{4}(?!\d)"), _h_phone),
    (re.compile(r"(?P<h>\d{1,2})(?P<sep>[:;.])(?P<m>\d{2})(?!\d|[.,]\d)"
                r"(?:\s?" + _AP + r"|(?P<ap1>[ap])\b)?", _I), _h_time),
    (re.compile(r"(?P<d>\d{1,4})(?:\s?" + _AP + r"|(?P<ap1>[ap])\b)", _I), _h_hour_ampm),
    (re.compile(r"(?P<n>\d+)(?:st|nd|rd|th)\b", _I), _h_ordinal),
    (re.compile(r"(?P<n>\d\d\d0|\d0)['’]?s\b"), _h_decade),
    (re.compile(r"(?P<a>\d{1,2})/(?P<b>\d{1,2})(?:/(?P<y>\d{4}|\d{2}))?(?![\d/])"), _h_slash),
    (re.compile(r"(?P<num>(?P<w>\d[\d,]*?)(?:\.(?P<f>\d+))?)\s?(?P<pct>%|percent\b)", _I), _h_percent),
    (re.compile(r"(?P<w>\d+)(?:\.(?P<f>\d+))?(?:\s?°(?:\s?(?P<u>[FC])\b)?|(?P<u2>[FC])\b)"), _h_degrees),
    (re.compile(r"(?P<a>\d+)\s?(?P<dash>[-–])\s?(?P<b>\d+)(?![\d:/]|\.\d)"), _h_range),
    (re.compile(r"(?P<w>\d{1,3}(?:,\d{3})+)(?:\.(?P<f>\d+))?(?!\d)"), _h_commas),
    (re.compile(r"(?P<w>\d+)\.(?P<f>\d+)"), _h_decimal),
    (re.compile(r"\d+"), _h_integer),
]
_CURRENCY_RULE = (re.compile(r"(?P<cur>[$£€])\s?(?P<w>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<f>\d{1,2}))?(?!\d)"
                             r"(?:\s?(?P<mult>k|thousand|million|mm|bn|billion)\b)?", _I), _h_currency)
_MONTH_NAMES = "|".join(sorted(set(_MONTHS) | set(_MONTH_ABBR), key=len, reverse=True))
_LETTER_RULES: list[tuple["re.Pattern[str]", _Handler]] = [
    (re.compile(r"(?P<ap>[ap])\.\s?m\b\.?", _I), _h_ampm_abbr),
    (re.compile(r"[^\W\d_](?:\.[^\W\d_])+\.?(?![^\W\d_])"), _h_initialism),
    (re.compile(r"(?P<w>" + _STOP_ABBREVIATIONS + r")\.", _I), _h_abbrev),
    (re.compile(r"(?P<l>[^\W\d_]{1,3})(?P<d>\d{1,2})(?![\w'’])"), _h_letters_digits),
    (re.compile(r"(?P<mon>" + _MONTH_NAMES + r")\.?\s?(?P<d>\d{1,2})"
                r"(?:\s?(?P<dash>[-–])\s?(?P<d2>\d{1,2}))?(?![\d:.,]\d|\s?(?:[ap]\.?\s?m\b|%|°)|st|nd|rd|th|\d)",
                _I), _h_month_day),
    (re.compile(_LETTER + r"+(?:(?:" + _APOS + r")" + _LETTER + r"+)*"), _h_word),
]
# a slower word pattern for texts with UTF-8 read as cp1252 ("Iâ€™ve")
_MOJIBAKE_WORD = (re.compile(r"(?:(?!â€)" + _LETTER + r")+(?:(?:" + _APOS + r"|â€™)(?:(?!â€)" + _LETTER
                             + r")+)*"), _h_word)
_SYMBOL_RULES: list[tuple["re.Pattern[str]", _Handler]] = [
    (re.compile(r"#"), _h_hash),
    (re.compile(r"/"), _h_slash_word),
    (re.compile(r"[&+@%=°]"), _h_symbol),
]


def normalize_spans(text: str) -> list[Span]:
    """Normalised words of ``text``, each with the character span it came from.

    An item may hold several words (``"five dollars"``); :func:`normalize_text` joins them.
    """
    out: list[Span] = []
    mojibake = "â€" in text
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c.isdigit():
            rules = _DIGIT_RULES
        elif c.isalpha():
            rules = _LETTER_RULES if not mojibake else _LETTER_RULES[:-1] + [_MOJIBAKE_WORD]
        elif c in _CURRENCY:
            rules = [_CURRENCY_RULE]
        else:
            rules = _SYMBOL_RULES
        for pattern, handler in rules:
            m = pattern.match(text, i)
            if m is None or m.end() == i:
                continue
            spans = handler(m, text)
            if spans is None:
                continue
            if handler is not _h_word and handler is not _h_integer:
                _fire(handler.__name__[3:])
            out.extend(s for s in spans if s[0])
            i = m.end()
            break
        else:
            i += 1          # punctuation or an unknown symbol: dropped
    return out


def normalize_words(text: str) -> list[str]:
    """The normalised words of ``text`` (see :func:`normalize_text`)."""
    return " ".join(s[0] for s in normalize_spans(text)).split()


def normalize_text(text: str) -> str:
    """STOP spoken form: lower case, no punctuation, numbers/times/dates/ordinals/currency/% in words.

    >>> normalize_text("Set the alarm for 7:30 tonight.")
    'set the alarm for seven thirty tonight'
    """
    return " ".join(normalize_words(text))


# ------------------------------------------------------------------------------------ trees
@dataclass(frozen=True)
class NormalizedExample:
    """An utterance and its tree in STOP's normalised form.

    ``aligned``: the tree's tokens spell the utterance, so words were assigned by position.
    ``consistent``: the normalised tree's words joined equal ``normalized_utterance``.
    ``subsequence``: the decoupled tree's words are a subsequence of the utterance's words
    (the hard requirement for a copy-constrained model; implied by ``consistent``).
    ``crossing``: output words whose source characters straddle a bracket of the tree (the
    word was put at its first letter/digit; e.g. ``[SL:X Mom ] 's`` -> ``[SL:X mom's ]``).
    """

    normalized_utterance: str
    normalized_seqlogical: str
    decoupled_normalized_seqlogical: str
    aligned: bool = True
    consistent: bool = True
    subsequence: bool = True
    crossing: int = 0


def is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(w == h for h in it) for w in needle)


def _leaves(tree: Tree) -> list[tuple[Tree, int]]:
    out: list[tuple[Tree, int]] = []

    def walk(node: Tree) -> None:
        for k, child in enumerate(node.children):
            if isinstance(child, Tree):
                walk(child)
            else:
                out.append((node, k))

    walk(tree)
    return out


def _rebuild(node: Tree, new_words: dict[tuple[int, int], list[str]]) -> Tree:
    children: list[Tree | str] = []
    for k, child in enumerate(node.children):
        if isinstance(child, Tree):
            children.append(_rebuild(child, new_words))
        else:
            children.extend(new_words.get((id(node), k), []))
    return Tree(node.label, children)


_ALNUM = re.compile(r"[^\W_]")
_NONSPACE = re.compile(r"\S+")


def _assign_aligned(utterance: str, tokens: list[str], spans: list[Span],
                    parents: list[int]) -> tuple[list[list[str]], int]:
    """Give each normalised word to the tree token holding its first letter/digit.

    ``tokens`` concatenated equal ``utterance`` without whitespace. Returns the words per token
    and the number of words whose letters/digits lie under more than one parent (``crossing``).
    """
    # position in the whitespace-free text of a non-space character, via the utterance's
    # whitespace-separated pieces (their start offsets and compact offsets)
    starts: list[int] = []
    offsets: list[int] = []
    c = 0
    for m in _NONSPACE.finditer(utterance):
        starts.append(m.start())
        offsets.append(c)
        c += m.end() - m.start()
    ends: list[int] = []
    acc = 0
    for tok in tokens:
        acc += len(tok)
        ends.append(acc)      # token t covers compact [ends[t-1], ends[t])

    def token_at(pos: int) -> int:
        piece = bisect_right(starts, pos) - 1
        return bisect_right(ends, offsets[piece] + pos - starts[piece])

    assigned: list[list[str]] = [[] for _ in tokens]
    crossing = 0
    last = 0
    for words_, start, end in spans:
        m = _ALNUM.search(utterance, start, end)
        first = m.start() if m else start
        while first < end and utterance[first].isspace():
            first += 1
        target = token_at(first) if first < end else last
        if m:
            lo, hi = target, token_at(end - 1)
            while hi > lo and not utterance[end - 1].isalnum():
                end -= 1
                hi = token_at(end - 1)
            if hi > lo and len({parents[t] for t in range(lo, hi + 1) if _ALNUM.search(tokens[t])}) > 1:
                crossing += len(words_.split())
        target = max(target, last)
        assigned[target].extend(words_.split())
        last = target
    return assigned, crossing


_PLAIN_UTTERANCE = re.compile(r"[A-Za-z\s.,?!;:\"()-]*")
_NOT_PLAIN = re.compile(r"[A-Za-z]\.[A-Za-z]|\b[ap]\.\s?m\b|\b(?:" + _STOP_ABBREVIATIONS + r")\."
                        r"|\b(?:" + "|".join(sorted(set(_BARE_ABBREVIATIONS) | set(_INFORMAL))) + r")\b", re.I)
_CODES = re.compile(r"\b[A-Z]{2,3}\b")
_LETTERS = re.compile(r"[A-Za-z]+")
_FAST = True   # tests compare the fast path with the general one


def _parent_ids(tokens_at: list[tuple[Tree, int]]) -> list[int]:
    """An id per token that changes whenever a bracket lies between two tokens."""
    ids: list[int] = []
    group = 0
    for i, (node, k) in enumerate(tokens_at):
        if i:
            prev_node, prev_k = tokens_at[i - 1]
            if prev_node is not node or any(isinstance(c, Tree) for c in node.children[prev_k + 1:k]):
                group += 1
        ids.append(group)
    return ids


def normalize_example(utterance: str, seqlogical: "str | Tree") -> NormalizedExample:
    """Normalise an utterance and its full-word TOP tree with the same word rules.

    Raises :class:`conslu.logical_form.MalformedTreeError` for a malformed tree.
    """
    tree = seqlogical if isinstance(seqlogical, Tree) else parse_tree(seqlogical)
    leaves = _leaves(tree)
    tokens: list[str] = [node.children[k] for node, k in leaves]  # type: ignore[misc]
    aligned = "".join(tokens) == "".join(utterance.split())
    crossing = 0
    if (_FAST and aligned and _PLAIN_UTTERANCE.fullmatch(utterance) and not _NOT_PLAIN.search(utterance)
            and not _CODES.search(utterance)):
        # fast path (about half of TOPv2): only ASCII words and punctuation, nothing to expand
        utt_words = _LETTERS.findall(utterance.lower())
        norm_utt = " ".join(utt_words)
        assigned = [_LETTERS.findall(tok.lower()) for tok in tokens]
    else:
        spans = normalize_spans(utterance)
        norm_utt = " ".join(s[0] for s in spans)
        utt_words = norm_utt.split()
        if aligned:
            assigned, crossing = _assign_aligned(utterance, tokens, spans, _parent_ids(leaves))
        else:
            assigned = [normalize_words(tok) for tok in tokens]
    new_words = {(id(node), k): ws for (node, k), ws in zip(leaves, assigned)}
    norm_tree = _rebuild(tree, new_words)
    dec = decouple(norm_tree)
    consistent = tree_words(norm_tree) == utt_words
    subsequence = consistent or is_subsequence(tree_words(dec), utt_words)
    return NormalizedExample(
        normalized_utterance=norm_utt,
        normalized_seqlogical=str(norm_tree),
        decoupled_normalized_seqlogical=str(dec),
        aligned=aligned,
        consistent=consistent,
        subsequence=subsequence,
        crossing=crossing,
    )
