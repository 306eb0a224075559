"""A synthetic world of coloured shapes, drawn with Pillow, deterministic from a seed.

A scene holds one to three shapes (distinct colour-shape pairs) on a plain or textured,
light or dark background. Each scene comes with captions in varied phrasing and questions
with answers of five kinds: colour, shape, count, position and yes/no.

Splits: "train" and "test" use only the seen colour-shape pairs; every "heldout" scene holds
at least one pair of `HELD_OUT`, which BLIP-2's training never shows, so it measures
composition. "text" and "pretrain" draw from all pairs: they are what the frozen language model
and image encoder learn from before BLIP-2 exists, as OPT and EVA-CLIP learned from the web.

Geometry lives in world units: the canvas is 64 x 64 whatever resolution it is drawn at.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 64.0

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 210, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (130, 50, 180),
    "pink": (240, 120, 185),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "rectangle", "triangle")
# Never in BLIP-2's training (stages 1 and 2): one pair per colour, every shape at least twice.
HELD_OUT = frozenset({
    ("red", "triangle"), ("orange", "circle"), ("yellow", "rectangle"), ("green", "square"),
    ("blue", "rectangle"), ("purple", "circle"), ("pink", "square"), ("black", "triangle"),
    ("gray", "square"), ("white", "rectangle"),
})
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
SPLITS = ("train", "test", "heldout", "text", "pretrain")
BACKGROUNDS = ("plain", "stripes", "checker", "speckle", "gradient")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_KINDS = ("colour", "shape", "count", "position", "yesno")
# Half-extent of each shape's bounding circle, in units of its size.
_REACH = {"circle": 0.5, "square": 0.71, "rectangle": 0.56, "triangle": 0.6}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: float  # centre, world units
    y: float
    size: float  # diameter / side / long side, world units
    angle: float  # degrees, counter-clockwise
    rgb: tuple[int, int, int]  # the colour with a little jitter

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Style:
    """How a scene is drawn: none of it changes what the scene says."""

    resolution: int = 64  # pixels per side of the drawn image
    supersample: int = 1  # draw this many times larger, then downsample (anti-aliasing)
    rotation: float = 0.0  # whole-image rotation, degrees
    noise: float = 0.0  # std of Gaussian pixel noise, 0-255 scale
    blur: float = 0.0  # Gaussian blur radius, pixels
    seed: int = 0  # for textures and noise


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right
    background: str  # one of BACKGROUNDS
    dark: bool
    bg_rgb: tuple[int, int, int]
    style: Style = field(default_factory=Style)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [s.pair for s in self.shapes]


@dataclass(frozen=True)
class QA:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


# ---------------------------------------------------------------- sampling scenes
def scene_rng(split: str, index: int, seed: int = 0) -> random.Random:
    """The random stream of one scene: scenes can be made in any order, one at a time."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return random.Random(f"blip2-demo/{seed}/{split}/{index}")


def sample_scene(split: str, index: int, seed: int = 0, plain_style: bool = False) -> Scene:
    """Scene `index` of `split`. plain_style draws it at 64 px with no rotation, noise or blur."""
    rng = scene_rng(split, index, seed)
    pairs = _sample_pairs(rng, split)
    dark = _pick_tone(rng, pairs)
    background = rng.choice(BACKGROUNDS)
    bg_rgb = _background_rgb(rng, dark)
    shapes = _place(rng, pairs)
    style = Style(seed=rng.getrandbits(32)) if plain_style else _sample_style(rng)
    return Scene(shapes, background, dark, bg_rgb, style)


def _sample_pairs(rng: random.Random, split: str) -> list[tuple[str, str]]:
    count = rng.choice((1, 2, 3))
    pool = ALL_PAIRS if split in ("text", "pretrain") else SEEN_PAIRS
    while True:
        pairs = []
        if split == "heldout":
            pairs.append(rng.choice(sorted(HELD_OUT)))
            pool = ALL_PAIRS
        while len(pairs) < count:
            pair = rng.choice(pool)
            if pair not in pairs:
                pairs.append(pair)
        colours = {c for c, _ in pairs}
        if not {"black", "white"} <= colours:  # one needs a light background, the other a dark one
            return pairs


def _pick_tone(rng: random.Random, pairs) -> bool:
    colours = {c for c, _ in pairs}
    if "white" in colours:
        return True
    if "black" in colours:
        return False
    return rng.random() < 0.4


def _background_rgb(rng: random.Random, dark: bool) -> tuple[int, int, int]:
    base = rng.randint(15, 60) if dark else rng.randint(215, 250)
    return tuple(min(255, max(0, base + rng.randint(-10, 10))) for _ in range(3))


def _jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-14, 14))) for v in rgb)


def _place(rng: random.Random, pairs) -> tuple[Shape, ...]:
    """Non-overlapping positions; restarts with smaller shapes when crowded."""
    for attempt in range(200):
        shrink = 1.0 - 0.2 * (attempt // 50)
        placed: list[Shape] = []
        for colour, shape in pairs:
            size = rng.uniform(11, 22) * shrink
            reach = _REACH[shape] * size
            angle = rng.uniform(-12, 12) + (90 if shape == "rectangle" and rng.random() < 0.3 else 0)
            for _ in range(30):
                x = rng.uniform(reach + 2, CANVAS - reach - 2)
                y = rng.uniform(reach + 2, CANVAS - reach - 2)
                if all(math.hypot(x - o.x, y - o.y) > reach + _REACH[o.shape] * o.size + 3 for o in placed):
                    placed.append(Shape(colour, shape, x, y, size, angle, _jitter(rng, COLOURS[colour])))
                    break
            else:
                break
        if len(placed) == len(pairs):
            return tuple(sorted(placed, key=lambda s: s.x))
    raise RuntimeError("could not place the shapes")  # never happens with three shapes this small


def _sample_style(rng: random.Random) -> Style:
    """Variation in drawing, so the model does not learn one rasteriser's habits."""
    return Style(
        resolution=rng.choice((48, 64, 64, 80, 96, 128)),
        supersample=rng.choice((1, 1, 4)),
        rotation=rng.uniform(-8, 8) if rng.random() < 0.25 else 0.0,
        noise=rng.uniform(2, 14) if rng.random() < 0.35 else 0.0,
        blur=rng.uniform(0.3, 0.9) if rng.random() < 0.15 else 0.0,
        seed=rng.getrandbits(32),
    )


# ---------------------------------------------------------------- drawing
def outline(shape: Shape, scale: float = 1.0) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels at `scale` pixels per world unit; None for a circle."""
    s, kind = shape.size, shape.shape
    if kind == "circle":
        return None
    if kind == "square":
        pts = [(-s / 2, -s / 2), (s / 2, -s / 2), (s / 2, s / 2), (-s / 2, s / 2)]
    elif kind == "rectangle":
        pts = [(-s / 2, -s / 4), (s / 2, -s / 4), (s / 2, s / 4), (-s / 2, s / 4)]
    elif kind == "triangle":
        r = 0.6 * s
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.radians(d) for d in (-90, 30, 150))]
        pts = [(px, py + 0.15 * s) for px, py in pts]  # centre the bounding box, not the centroid
    else:
        raise ValueError(f"unknown shape {kind!r}")
    a = math.radians(-shape.angle)  # image y points down: negate for counter-clockwise
    cos, sin = math.cos(a), math.sin(a)
    return [((shape.x + px * cos - py * sin) * scale, (shape.y + px * sin + py * cos) * scale) for px, py in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: float, fill) -> None:
    pts = outline(shape, scale)
    if pts is None:
        r = shape.size / 2
        draw.ellipse([(shape.x - r) * scale, (shape.y - r) * scale, (shape.x + r) * scale, (shape.y + r) * scale], fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def _texture(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The background as (size, size, 3) floats."""
    base = np.array(scene.bg_rgb, dtype=np.float32)
    unit = size / CANVAS
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / unit  # world units
    amp = float(rng.uniform(10, 22))
    if scene.dark:
        amp *= 0.7
    kind = scene.background
    if kind == "plain":
        delta = np.zeros_like(xx)
    elif kind == "stripes":
        width = float(rng.uniform(3, 6))
        direction = rng.integers(3)
        coord = (xx, yy, (xx + yy) / math.sqrt(2))[direction]
        delta = np.where((coord // width) % 2 == 0, amp, -amp)
    elif kind == "checker":
        cell = float(rng.uniform(4, 8))
        delta = np.where(((xx // cell) + (yy // cell)) % 2 == 0, amp, -amp)
    elif kind == "speckle":
        cells = rng.normal(0, amp, (16, 16)).astype(np.float32)
        delta = cells[(yy / 4).astype(int).clip(0, 15), (xx / 4).astype(int).clip(0, 15)]
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        delta = ((xx * math.cos(angle) + yy * math.sin(angle)) / CANVAS - 0.5) * 2.5 * amp
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(base[None, None, :] + delta[..., None], 0, 255)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.style.resolution pixels per side."""
    st = scene.style
    rng = np.random.default_rng(st.seed)
    size = st.resolution * st.supersample
    image = Image.fromarray(_texture(scene, st.resolution, rng).astype(np.uint8), "RGB")
    if st.supersample > 1:  # the texture's own edges need no anti-aliasing
        image = image.resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, size / CANVAS, shape.rgb)
    if st.supersample > 1:
        image = image.resize((st.resolution, st.resolution), Image.BOX)
    if st.rotation:
        image = image.rotate(st.rotation, Image.BICUBIC, fillcolor=scene.bg_rgb)
    if st.blur:
        image = image.filter(ImageFilter.GaussianBlur(st.blur))
    if st.noise:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, st.noise, (st.resolution, st.resolution, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image


def object_map(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size) uint8: 0 for background, k + 1 where shape k (left to right) is drawn."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for k, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, size / CANVAS, k + 1)
    if scene.style.rotation:
        mask = mask.rotate(scene.style.rotation, Image.NEAREST, fillcolor=0)
    return np.asarray(mask)


# ---------------------------------------------------------------- language
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(pair: tuple[str, str]) -> str:
    colour, shape = pair
    return f"{article(colour)} {colour} {shape}"


def listing(pairs) -> str:
    phrases = [noun_phrase(p) for p in pairs]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def background_phrase(scene: Scene) -> str:
    tone = "dark" if scene.dark else "light"
    return {
        "plain": f"a plain {tone} background",
        "stripes": f"a {tone} striped background",
        "checker": f"a {tone} checkered background",
        "speckle": f"a {tone} speckled background",
        "gradient": f"a {tone} shaded background",
    }[scene.background]


def canonical_caption(scene: Scene) -> str:
    """The plainest caption: the shapes, left to right."""
    return listing(scene.pairs)


def captions(scene: Scene) -> list[str]:
    """Every phrasing of the scene's caption; the shapes are always listed left to right."""
    things = listing(scene.pairs)
    n = len(scene.shapes)
    counted = f"{NUMBERS[n]} shape{'s' if n > 1 else ''}"
    return [
        things,
        f"a picture of {things}",
        f"an image of {things}",
        f"a drawing of {things}",
        f"{things} on {background_phrase(scene)}",
        f"there is {things}" if n == 1 else f"there are {NUMBERS[n]} shapes: {things}",
        f"{counted}: {things}",
        f"{counted} on {background_phrase(scene)}: {things}",
    ]


_PAIR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The colour-shape pairs a caption names, in order."""
    return [(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(text.lower())]


def caption_correct(text: str, scene: Scene) -> bool:
    """All attributes right: the same shapes in the same colours, as many as there are."""
    return sorted(parse_caption(text)) == sorted(scene.pairs)


# ---------------------------------------------------------------- questions
_COLOUR_Q = ("what colour is the {shape}?", "what color is the {shape}?", "which colour does the {shape} have?")
_SHAPE_Q = ("what shape is the {colour} one?", "what is the {colour} shape?", "which shape is {colour}?")
_COUNT_Q = ("how many shapes are there?", "how many objects are in the picture?", "how many {shape}s are there?")
_WHERE_Q = ("where is the {a} relative to the {b}?", "is the {a} left, right, above or below the {b}?")
_SIDE_Q = ("is the {a} {rel} the {b}?",)
_EXIST_Q = ("is there {np}?", "do you see {np}?", "is there {np} in the image?")
_RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of each kind the scene allows (a position question needs two shapes)."""
    out = []
    for kind in QUESTION_KINDS:
        qa = QUESTION_MAKERS[kind](scene, rng)
        if qa is not None:
            out.append(qa)
    return out


def _targets(scene: Scene, rng: random.Random) -> list[Shape]:
    """Shapes to ask about, held-out pairs first: the held-out score is about composition."""
    novel = [s for s in scene.shapes if s.pair in HELD_OUT]
    rest = [s for s in scene.shapes if s.pair not in HELD_OUT]
    rng.shuffle(novel)
    rng.shuffle(rest)
    return novel + rest


def _colour_question(scene: Scene, rng: random.Random) -> QA | None:
    kinds = [s.shape for s in scene.shapes]
    for s in _targets(scene, rng):
        if kinds.count(s.shape) == 1:
            return QA("colour", rng.choice(_COLOUR_Q).format(shape=s.shape), s.colour)
    return None


def _shape_question(scene: Scene, rng: random.Random) -> QA | None:
    colours = [s.colour for s in scene.shapes]
    for s in _targets(scene, rng):
        if colours.count(s.colour) == 1:
            return QA("shape", rng.choice(_SHAPE_Q).format(colour=s.colour), s.shape)
    return None


def _count_question(scene: Scene, rng: random.Random) -> QA:
    template = rng.choice(_COUNT_Q)
    if "{shape}" in template:
        kind = rng.choice(scene.shapes).shape
        n = sum(s.shape == kind for s in scene.shapes)
        return QA("count", template.format(shape=kind), NUMBERS[n])
    return QA("count", template, NUMBERS[len(scene.shapes)])


def relation(a: Shape, b: Shape, margin: float = 4.0) -> str | None:
    """Where a is relative to b along the clearly dominant axis; None when it is not clear."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy) + margin:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) + margin:
        return "above" if dy < 0 else "below"
    return None


def _name(s: Shape) -> str:
    return f"{s.colour} {s.shape}"


def _position_question(scene: Scene, rng: random.Random) -> QA | None:
    targets = _targets(scene, rng)
    for a in targets:
        for b in targets:
            rel = relation(a, b) if a is not b else None
            if rel is None:
                continue
            if rng.random() < 0.5:
                return QA("position", rng.choice(_WHERE_Q).format(a=_name(a), b=_name(b)), rel)
            asked = rel if rng.random() < 0.5 else rng.choice([r for r in _RELATIONS if r != rel])
            question = rng.choice(_SIDE_Q).format(a=_name(a), rel=_RELATIONS[asked], b=_name(b))
            return QA("position", question, "yes" if asked == rel else "no")
    return None


def _yesno_question(scene: Scene, rng: random.Random) -> QA:
    present = scene.pairs
    if rng.random() < 0.5:
        pair = rng.choice(_targets(scene, rng)).pair
    else:
        # Mostly near misses, one attribute changed: a model that does not bind colour to shape fails them.
        colour, shape = rng.choice(present)
        options = [(c, shape) for c in COLOURS] + [(colour, s) for s in SHAPES]
        if rng.random() < 0.2:
            options = list(ALL_PAIRS)
        options = [p for p in options if p not in present]
        pair = rng.choice(options)
    answer = "yes" if pair in present else "no"
    return QA("yesno", rng.choice(_EXIST_Q).format(np=noun_phrase(pair)), answer)


QUESTION_MAKERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
    "yesno": _yesno_question,
}


# ---------------------------------------------------------------- examples
@dataclass
class Example:
    scene: Scene
    image: Image.Image
    captions: list[str]
    qa: list[QA]


def example(split: str, index: int, seed: int = 0, plain_style: bool = False) -> Example:
    """Scene `index` of `split`, drawn, with its captions and questions."""
    scene = sample_scene(split, index, seed, plain_style)
    rng = random.Random(f"blip2-demo-questions/{seed}/{split}/{index}")
    return Example(scene, render(scene), captions(scene), questions(scene, rng))


def text_corpus(count: int, seed: int = 0) -> list[list[str]]:
    """The language model's reading: `count` short documents over all colour-shape pairs (a
    language model has read about every pair, as a real one has).

    Most documents are about one scene: a caption, the caption again (text repeats itself: titles,
    quotes, lists), the scene in other words, and questions answered. The rest are lists of
    shapes, given twice. Later lines follow from earlier ones, so the model learns to read and
    copy from its context, which is where BLIP-2 puts the image.
    """
    docs = []
    for i in range(count):
        rng = random.Random(f"blip2-demo-text/{seed}/{i}")
        if rng.random() < 0.25:
            items = listing(rng.sample(ALL_PAIRS, rng.randint(2, 6)))
            line = f"a list of shapes: {items}"
            docs.append([line, line])
            continue
        scene = sample_scene("text", i, seed, plain_style=True)
        first, other = rng.sample(captions(scene), 2)
        qas = questions(scene, rng)
        asked = [f"Question: {qa.question} Answer: {qa.answer}" for qa in rng.sample(qas, min(3, len(qas)))]
        docs.append([first, first, other, *asked])
    return docs
