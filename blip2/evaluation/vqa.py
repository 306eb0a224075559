"""VQA accuracy with the rules of the official VQAv2 evaluation script.

An answer is cleaned (whitespace), its punctuation handled (removed where it touches a space or
when the text holds a digit-comma-digit, otherwise replaced by a space; periods not beside a digit
removed), lower-cased, number words mapped to digits, articles dropped and contractions given their
apostrophes. With several ground-truth answers (VQAv2 has ten) the score is the official soft
accuracy: for each answer left out in turn, min(1, matches among the others / 3), averaged.
With one ground-truth answer it is exact match after normalisation.

The official script normalises ground-truth answers with the punctuation rule only, because
VQAv2's annotations are stored normalised; user data is not, so here they get the same full
normalisation as predictions (which leaves VQAv2's stored answers as they are).
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead for the two
# characters "<=" and a digit (a mistyped look-behind), so in effect: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")


def _contractions() -> dict[str, str]:
    """Contractions written without apostrophes -> with them ("dont" -> "don't")."""
    table = {}
    for word in ("aren't", "can't", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't", "haven't",
                 "isn't", "mightn't", "mustn't", "needn't", "shan't", "shouldn't", "wasn't", "weren't", "won't",
                 "wouldn't", "ain't", "could've", "should've", "would've", "might've", "must've", "he'd", "he'll",
                 "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm", "i've", "it'd", "it'll", "it's", "let's",
                 "ma'am", "o'clock", "she'd", "she'll", "she's", "somebody'd", "somebody'll", "somebody's",
                 "someone'd", "someone'll", "someone's", "something'd", "something'll", "something's", "that'd",
                 "that's", "there'd", "there're", "there's", "they'd", "they'll", "they're", "they've", "we'd",
                 "we'll", "we're", "we've", "what'll", "what're", "what's", "what've", "when's", "where'd",
                 "where's", "where've", "who'd", "who'll", "who's", "who've", "why'll", "why're", "why's",
                 "y'all", "you'd", "you'll", "you're", "you've", "couldn't've", "shouldn't've", "wouldn't've",
                 "mightn't've", "he'd've", "i'd've", "she'd've", "they'd've", "we'd've", "you'd've", "it'd've",
                 "who'd've", "someone'd've", "somebody'd've", "something'd've", "there'd've"):
        table[word.replace("'", "")] = word
        parts = word.split("'")
        if len(parts) == 3:  # one of two apostrophes missing: "couldnt've", "couldn'tve"
            table[parts[0] + parts[1] + "'" + parts[2]] = word
            table[parts[0] + "'" + parts[1] + parts[2]] = word
    return table


CONTRACTIONS = _contractions()


def strip_punctuation(text: str) -> str:
    out = text
    keep_together = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # decided on the text as given, replaced in the text as it goes (as the official script does)
        out = out.replace(p, "" if keep_together or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def normalise_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalise_answer(answer: str) -> str:
    """An answer as the official script compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalise_words(strip_punctuation(answer))


def answer_score(prediction: str, answers: list[str]) -> float:
    """The accuracy of one prediction against the ground-truth answers (see the module docstring)."""
    if not answers:
        raise ValueError("a question needs at least one ground-truth answer")
    predicted = normalise_answer(prediction)
    truth = [normalise_answer(a) for a in answers]
    if len(truth) == 1:
        return float(predicted == truth[0])
    scores = []
    for left_out in range(len(truth)):
        matches = sum(t == predicted for i, t in enumerate(truth) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """{"vqa_accuracy": mean score, "n": questions} over parallel lists."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    scores = [answer_score(p, a) for p, a in zip(predictions, answers)]
    return {"vqa_accuracy": sum(scores) / max(1, len(scores)), "n": len(scores)}
