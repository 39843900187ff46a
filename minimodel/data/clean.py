"""Light cleaning of verse text: editorial matter that some Bible versions carry inside verses.

Each rule is what was found in the embedded corpora (examples in the comments); the text itself is left alone.
Bump CLEANING_VERSION when a rule changes: it is part of the data's input hash, so old builds are rebuilt.
"""
from __future__ import annotations

import re
import unicodedata

from minimodel.data.corpora import split_verse_id

CLEANING_VERSION = 1

# Cross-references and alternative verse numbers: "(इब्रा. 1:10, इब्रा. 11:3)" (hi), "(7:26)" (fr Segond/Ostervald).
_CROSS_REFERENCE = re.compile(r"\([^()]*\d\s*:\s*\d[^()]*\)")
_OPEN_VERSE_NUMBER = re.compile(r"\(\d{1,3}:\d{1,3}\s")  # "(5:21 Lorsque ..." (fr Segond), closed verses later
# Notes from the corpus compiler: "(ADDED FROM KJV: ...)" (tr, ru, ja).
_EDITORIAL_NOTE = re.compile(r"\(ADDED FROM [^()]*\)")
# Footnote markers: "masihi*fq*" (sw), "मसीह*" (hi), "#Dieu" (fr Darby), "*****" (ar).
_FOOTNOTE_TAG = re.compile(r"\*[a-z]{1,3}\*")
_MARK_BETWEEN_WORDS = re.compile(r"(?<=\w)[*#]+(?=\w)")
_MARK = re.compile(r"[*#]+")
# Brackets around words supplied by translators or of disputed origin: keep the words (en WEB, sw, hi).
_BRACKETS = re.compile(r"[\[\]<>]")
_EMPTY_PARENTHESES = re.compile(r"\(\s*\)")
# A section heading printed before the verse's own number: "Dünyanın Yaratılışı. 1 Başlangıçta ..." (tr, Gen 1:1).
_HEADING_BEFORE_NUMBER = re.compile(r"^[^.!?\d]{1,80}[.!?]\s+(\d{1,3})\s+(?=\w)")
# The next psalm's title glued to a psalm's last verse: "... in him. Psalm 3 A Psalm by David, ..." (en WEB).
_NEXT_PSALM_TITLE = re.compile(r"\s+Psalm\s+(\d{1,3})\s+\w.*$")
PSALMS = 19


def normalize_spaces(text: str) -> str:
    """One Unicode form (NFC: the same sentence composed and decomposed, as Vietnamese web text mixes them, is one
    text to deduplication and the split, as it is to the tokenizer) and single spaces."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def clean_verse(text: str, vid: int) -> str:
    """The verse's own text, without headings, cross-references, footnote marks and brackets."""
    book, chapter, verse = split_verse_id(vid)
    text = text.replace("`", "'")  # en WEB writes apostrophes as backticks
    if "(" in text:
        text = _EDITORIAL_NOTE.sub("", text)
        text = _CROSS_REFERENCE.sub("", text)
        text = _OPEN_VERSE_NUMBER.sub("", text)
    if "*" in text or "#" in text:
        text = _FOOTNOTE_TAG.sub("", text)
        text = _MARK_BETWEEN_WORDS.sub(" ", text)
        text = _MARK.sub("", text)
    text = _BRACKETS.sub("", text)
    if "(" in text:
        text = _EMPTY_PARENTHESES.sub("", text)
    text = normalize_spaces(text)
    heading = _HEADING_BEFORE_NUMBER.match(text)
    if heading and int(heading.group(1)) == verse:
        text = text[heading.end():]
    title = _NEXT_PSALM_TITLE.search(text) if book == PSALMS else None
    if title and int(title.group(1)) == chapter + 1:
        text = text[:title.start()]
    return text
