"""The world's questions and captions as instructions, for the instruction-aware demo model.

Each kind of question has several phrasings, as InstructBLIP's templates vary theirs; some
phrasings of every kind are held out of training ("unseen" wording), so the evaluation can ask
in words the model never read. Kinds:

- colour: the colour of a named shape ("what colour is the circle?")
- shape: the shape of a named colour ("what is the red shape?")
- count: shapes, or shapes of one kind or colour, zero included
- exist: yes/no, "is there a red circle?", also negated ("is there no blue shape?",
  "is there not a circle?": yes when there is none)
- position: where one shape is relative to another (left/right/above/below), or yes/no ("is the
  red circle above the blue square?": yes when that is the true relation)
- describe: "what is in the image?" and the caption instructions: the shapes, left to right

Answers are one word, except describe's (a caption).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from . import world

KINDS = ("colour", "shape", "count", "exist", "position", "describe")
WORDINGS = ("seen", "unseen")
QUESTION_TEMPLATE = "Question: {} Answer:"  # OPT's family template: what `blip2 ask` and the server send
CAPTION_PROMPT = "A short image description:"  # `blip2 caption`'s instruction for an InstructBLIP model

# kind -> (phrasings trained on, phrasings held out of training)
PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (
        ("what colour is the {shape}?", "what color is the {shape}?", "which colour does the {shape} have?",
         "what is the colour of the {shape}?", "tell me the colour of the {shape}.", "the {shape} is which colour?",
         "name the color of the {shape}.", "what colour has the {shape} got?", "do you know the colour of the {shape}?"),
        ("which color is the {shape} in the picture?", "can you tell me what colour the {shape} is?",
         "what is the color of the {shape} in the image?"),
    ),
    "shape": (
        ("what shape is the {colour} one?", "what is the {colour} shape?", "which shape is {colour}?",
         "what kind of shape is {colour}?", "name the {colour} shape.", "the {colour} object is which shape?",
         "what is the {colour} object?", "which shape has the colour {colour}?", "can you name the {colour} shape?"),
        ("what is the shape of the {colour} thing?", "what shape is drawn in {colour}?",
         "which of the shapes is {colour}?"),
    ),
    "count": (
        ("how many shapes are there?", "how many objects are in the picture?", "how many {shape}s are there?",
         "how many {colour} shapes are there?", "count the shapes.", "what is the number of {shape}s?",
         "how many {shape}s do you see?", "how many {colour} objects are there?",
         "do you know how many {shape}s there are?"),
        ("how many things are in the image?", "count the {shape}s.", "how many {colour} shapes can you see?"),
    ),
    "exist": (
        ("is there {np}?", "do you see {np}?", "is there {np} in the image?", "does the picture contain {np}?",
         "can you see {np}?", "is there no {bare}?", "is there not {np}?", "is {np} missing?",
         "is there no {bare} in the picture?", "tell me if there is {np}."),
        ("does the image show {np}?", "is {np} present?", "is it true that there is no {bare}?",
         "is {np} absent?"),
    ),
    "position": (
        ("where is the {a} relative to the {b}?", "is the {a} left, right, above or below the {b}?",
         "where is the {a} compared to the {b}?", "in which direction from the {b} is the {a}?",
         "is the {a} {rel} the {b}?", "is the {a} located {rel} the {b}?"),
        ("where is the {a} in relation to the {b}?", "what is the position of the {a} relative to the {b}?",
         "would you say the {a} is {rel} the {b}?"),
    ),
    "describe": (
        ("", CAPTION_PROMPT, "what is in the image?", "describe the image.", "what do you see?",
         "what does the picture show?", "which shapes are there?"),
        ("what is shown in this picture?", "describe what you see.", "what is drawn here?"),
    ),
}
# Some seen phrasings open as questions of the other answer type ("do you know the colour of ...?", "tell me if
# there is ..."): once yes/no is trained hard, a model that reads the answer's type off the opening says yes to
# "can you tell me what colour the circle is?" (REPORT.md), so no opening may decide it.
# Phrasings that are instructions rather than questions: the language model reads them as they are.
CAPTION_INSTRUCTIONS = frozenset({"", CAPTION_PROMPT, "describe the image.", "describe what you see."})
# Negated existence phrasings: their answer is yes when the thing is NOT there.
NEGATED = frozenset({"is there no {bare}?", "is there not {np}?", "is {np} missing?",
                     "is there no {bare} in the picture?", "is it true that there is no {bare}?", "is {np} absent?"})
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NEGATION_WORDS = (" no ", " not ", " missing", " absent")  # what every NEGATED phrasing, and no other, says


@dataclass(frozen=True)
class Instruction:
    kind: str  # one of KINDS
    text: str  # the question or instruction, as a user types it
    answer: str  # what a right answer says (describe: a caption naming every shape)
    relation: str = ""  # position: the true relation of a to b, in either form (`fact`)
    one_kind: bool = False  # count: of one shape kind or one colour, not of every shape (`fact`)
    named: tuple[int, ...] = ()  # position: where a and b are in the scene's shapes

    @property
    def prompt(self) -> str:
        """What the language model and the Q-Former read: a question in the VQA template, an instruction as is."""
        return self.text if self.text in CAPTION_INSTRUCTIONS else QUESTION_TEMPLATE.format(self.text)


def phrasings(kind: str, wording: str) -> tuple[str, ...]:
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; expected one of {WORDINGS}")
    return PHRASINGS[kind][WORDINGS.index(wording)]


def instruction(scene: world.Scene, kind: str, rng: random.Random, wording: str = "seen") -> Instruction | None:
    """One instruction of `kind` about the scene, or None when the scene allows none (e.g. position, one shape)."""
    return _MAKERS[kind](scene, rng, phrasings(kind, wording))


def instructions(scene: world.Scene, rng: random.Random, wording: str = "seen") -> list[Instruction]:
    """One instruction of every kind the scene allows."""
    return [ins for kind in KINDS if (ins := instruction(scene, kind, rng, wording)) is not None]


def is_negated(ins: Instruction) -> bool:
    """A negated existence question ("is there no red circle?"): yes when the thing is not there."""
    return ins.kind == "exist" and any(w in f" {ins.text}" for w in NEGATION_WORDS)


def is_yes_no_position(ins: Instruction) -> bool:
    """A position question in its yes/no form ("is the red circle above the blue square?"): yes
    when the relation asked is the true one."""
    return ins.kind == "position" and ins.answer in ("yes", "no")


def is_indirect(ins: Instruction) -> bool:
    """A question whose answer is not its fact but follows from it (`fact`): a negated existence
    question, or a yes/no position question."""
    return is_negated(ins) or is_yes_no_position(ins)


def fact(ins: Instruction) -> str:
    """The fact asked about: the answer, except that a negated existence question's is whether the
    thing is there (its answer flipped), a position question's is the true relation in either
    form (a yes/no one's answer: is it the relation asked), and a count of one kind's is whether
    any is there (the existence question inside it: "how many circles?" asks "is there a circle?")."""
    if ins.kind == "position" and ins.relation:
        return ins.relation
    if ins.one_kind:
        return "no" if ins.answer == "zero" else "yes"
    return {"yes": "no", "no": "yes"}[ins.answer] if is_negated(ins) else ins.answer


def _colour(scene, rng, options) -> Instruction | None:
    kinds = [s.shape for s in scene.shapes]
    for s in world._targets(scene, rng):  # held-out pairs first: their score is about composition
        if kinds.count(s.shape) == 1:
            return Instruction("colour", rng.choice(options).format(shape=s.shape), s.colour)
    return None


def _shape(scene, rng, options) -> Instruction | None:
    colours = [s.colour for s in scene.shapes]
    for s in world._targets(scene, rng):
        if colours.count(s.colour) == 1:
            return Instruction("shape", rng.choice(options).format(colour=s.colour), s.shape)
    return None


def _count(scene, rng, options) -> Instruction:
    template = rng.choice(options)
    if "{shape}" in template:
        # Half the time a kind the scene shows, else any kind (zero is an answer too).
        shape = rng.choice(scene.shapes).shape if rng.random() < 0.6 else rng.choice(world.SHAPES)
        n = sum(s.shape == shape for s in scene.shapes)
        return Instruction("count", template.format(shape=shape), world.NUMBERS[n], one_kind=True)
    if "{colour}" in template:
        colour = rng.choice(scene.shapes).colour if rng.random() < 0.6 else rng.choice(list(world.COLOURS))
        n = sum(s.colour == colour for s in scene.shapes)
        return Instruction("count", template.format(colour=colour), world.NUMBERS[n], one_kind=True)
    return Instruction("count", template, world.NUMBERS[len(scene.shapes)])


def _exist(scene, rng, options) -> Instruction:
    """A pair, a colour ("a blue shape") or a kind ("a circle"); present half the time, else mostly
    a near miss (one attribute changed), which a model that does not bind colour to shape gets wrong."""
    template = rng.choice(options)
    target = rng.choice(("pair", "pair", "colour", "shape"))
    pairs = scene.pairs
    if rng.random() < 0.5:
        colour, shape = rng.choice(world._targets(scene, rng)).pair
    else:
        colour, shape = rng.choice(pairs)
        if target == "pair":
            options_ = [(c, shape) for c in world.COLOURS] + [(colour, s) for s in world.SHAPES]
            options_ = [p for p in options_ if p not in pairs] or [p for p in world.ALL_PAIRS if p not in pairs]
            colour, shape = rng.choice(options_)
        elif target == "colour":
            colour = rng.choice([c for c in world.COLOURS if c not in {p[0] for p in pairs}])
        else:
            absent = [s for s in world.SHAPES if s not in {p[1] for p in pairs}]
            shape = rng.choice(absent) if absent else shape
    if target == "pair":
        bare, present = f"{colour} {shape}", (colour, shape) in pairs
    elif target == "colour":
        bare, present = f"{colour} shape", any(c == colour for c, _ in pairs)
    else:
        bare, present = shape, any(s == shape for _, s in pairs)
    text = template.format(np=f"{world.article(bare)} {bare}", bare=bare)
    yes = present != (template in NEGATED)
    return Instruction("exist", text, "yes" if yes else "no")


def _position(scene, rng, options) -> Instruction | None:
    targets = world._targets(scene, rng)
    for a in targets:
        for b in targets:
            rel = world.relation(a, b) if a is not b else None
            if rel is None:
                continue
            template = rng.choice(options)
            names = {"a": f"{a.colour} {a.shape}", "b": f"{b.colour} {b.shape}"}
            named = (scene.shapes.index(a), scene.shapes.index(b))
            if "{rel}" not in template:
                return Instruction("position", template.format(**names), rel, rel, named=named)
            asked = rel if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != rel])
            return Instruction("position", template.format(rel=RELATIONS[asked], **names),
                               "yes" if asked == rel else "no", rel, named=named)
    return None


def _describe(scene, rng, options) -> Instruction:
    return Instruction("describe", rng.choice(options), world.canonical_caption(scene))


_MAKERS = {"colour": _colour, "shape": _shape, "count": _count, "exist": _exist, "position": _position,
           "describe": _describe}


def normalise(text: str) -> str:
    """An answer as compared: lower case, no surrounding spaces or final full stop."""
    return re.sub(r"[.!?\s]+$", "", text.strip().lower())


def is_right(ins: Instruction, said: str, scene: world.Scene) -> bool:
    """Exact match after `normalise`; a description is right when it names every shape with its colour, no more."""
    if ins.kind == "describe":
        return world.caption_correct(said, scene)
    return normalise(said) == ins.answer
