"""Caption metrics as the COCO caption evaluation computes them (pycocoevalcap, the `eval` extra).

Captions are tokenised as the COCO evaluation does: Stanford's PTB tokenizer, lower-cased, with
punctuation tokens dropped. That tokenizer and METEOR run on Java; without Java (or with
java=False) a Python tokenizer that follows the same rules takes its place and METEOR is left
out. SPICE needs Java and Stanford CoreNLP's models inside pycocoevalcap (downloaded by its
get_stanford_models); it is computed only when both are there.

Scores are on pycocoevalcap's scale (0-1 for BLEU, METEOR, ROUGE-L, SPICE; CIDEr about 0-10):
the papers print them times 100.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# Tokens the COCO evaluation drops after tokenising (as PTB spells them).
PUNCTUATION_TOKENS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                                "-", "--", "...", ";"})
# Brackets become PTB's names; lower-cased by -lowerCase they no longer match the list above
# and so stay in, as they do in the COCO evaluation.
_PTB_ESCAPES = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-", '"': "''"}
# Clitics PTB splits off: "don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can not".
_CLITIC = re.compile(r"(?i)(?<=\w)(n't|'s|'re|'ll|'ve|'m|'d)\b")
_SPECIAL_SPLITS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_ABBREVIATIONS = r"(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|co|no)\.(?!\w)"
_TOKEN = re.compile(r"\d+(?:[.,:/]\d+)+|(?:[a-z]\.){2,}|" + _ABBREVIATIONS
                    + r"|(?:n't|'[a-z]+)|\w+(?:[-&/]\w+)*|\.\.\.|--|\S")


def java_available() -> bool:
    return shutil.which("java") is not None


def _require_pycocoevalcap():
    try:
        import pycocoevalcap
    except ModuleNotFoundError:
        raise ModuleNotFoundError("caption metrics need pycocoevalcap: pip install 'blip2[eval]'") from None
    return pycocoevalcap


def ptb_tokenize(text: str) -> str:
    """One caption as the COCO evaluation's tokenizer leaves it (in Python): lower-case tokens, no punctuation."""
    text = text.replace("\n", " ").lower()
    text = " ".join(_SPECIAL_SPLITS.get(w, w) for w in text.split())
    text = _CLITIC.sub(r" \1", text)
    tokens = [_PTB_ESCAPES.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in PUNCTUATION_TOKENS)


def tokenize(captions: dict, java: bool) -> dict:
    """{key: [caption, ...]} -> the same with tokenised captions."""
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}


def spice_available() -> bool:
    if not java_available():
        return False
    _require_pycocoevalcap()
    from pycocoevalcap.spice import spice

    root = Path(spice.__file__).parent / "lib"
    return any(root.glob("stanford-corenlp-*-models.jar"))


def caption_metrics(predictions: dict, references: dict, java: bool | None = None,
                    spice: bool | None = None) -> dict[str, float]:
    """Corpus scores of one predicted caption per key against that key's reference captions.

    Args:
        predictions: {key: caption}; references: {key: [caption, ...]} over the same keys.
        java: use Java (PTB tokenizer, METEOR); default when `java` is on the PATH.
        spice: compute SPICE; default when Java and the Stanford models are there.
    """
    _require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ValueError(f"predictions and references differ: no prediction for {missing}, no reference for {extra}")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"no reference caption for {empty[:5]}")
    if not predictions:
        raise ValueError("no captions to score")
    java = java_available() if java is None else java
    gts = tokenize({k: list(v) for k, v in references.items()}, java)
    res = tokenize({k: [predictions[k]] for k in references}, java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice if spice is not None else (java and spice_available()):
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores
