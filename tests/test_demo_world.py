"""The synthetic world: deterministic, split by colour-shape pair, and its text says what its images show."""

from __future__ import annotations

import random

import numpy as np
import pytest

from blip2.demo import world
from blip2.demo.pretrain import scene_labels


def test_same_seed_same_world_other_seed_other_world():
    a, b = world.example("train", 7, seed=3), world.example("train", 7, seed=3)
    assert a.scene == b.scene and a.captions == b.captions and a.qa == b.qa
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = world.example("train", 7, seed=4)
    assert c.scene != a.scene


def test_enough_colours_and_shapes():
    assert {"red", "green", "blue", "yellow", "black", "gray", "white"} <= set(world.COLOURS)
    assert len(world.COLOURS) >= 8
    assert {"circle", "square", "rectangle", "triangle"} <= set(world.SHAPES)


def test_held_out_pairs_only_in_the_held_out_split():
    for i in range(300):
        assert not set(world.sample_scene("train", i).pairs) & world.HELD_OUT
        assert not set(world.sample_scene("test", i).pairs) & world.HELD_OUT
        assert set(world.sample_scene("heldout", i).pairs) & world.HELD_OUT
    # every colour and every shape is still seen in training, just not in those pairs
    assert {c for c, _ in world.SEEN_PAIRS} == set(world.COLOURS)
    assert {s for _, s in world.SEEN_PAIRS} == set(world.SHAPES)


def test_variety_of_scenes():
    scenes = [world.sample_scene("train", i) for i in range(300)]
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert {s.dark for s in scenes} == {True, False}
    assert len({round(shape.size) for s in scenes for shape in s.shapes}) > 5
    assert {p for s in scenes for p in s.pairs} == set(world.SEEN_PAIRS)
    assert len({s.style.resolution for s in scenes}) > 2


def test_white_only_on_dark_and_black_only_on_light():
    for i in range(300):
        scene = world.sample_scene("heldout", i)
        colours = {s.colour for s in scene.shapes}
        assert not ("white" in colours and not scene.dark)
        assert not ("black" in colours and scene.dark)


def test_shapes_are_apart_and_listed_left_to_right():
    for i in range(200):
        shapes = world.sample_scene("train", i).shapes
        assert [s.x for s in shapes] == sorted(s.x for s in shapes)
        for a in shapes:
            for b in shapes:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) > 4


def test_plain_drawing_shows_each_shape_in_its_colour():
    for i in range(40):
        ex = world.example("train", i, plain_style=True)
        pixels = np.asarray(ex.image).astype(int)
        assert ex.image.size == (64, 64)
        for shape in ex.scene.shapes:
            x, y = int(shape.x), int(shape.y)
            assert np.abs(pixels[y, x] - np.array(shape.rgb)).max() <= 2, (i, shape)


def test_styles_change_the_drawing_not_the_scene():
    plain, styled = world.sample_scene("train", 5, plain_style=True), world.sample_scene("train", 5)
    assert plain.shapes == styled.shapes and plain.background == styled.background
    image = world.render(styled)
    assert image.size == (styled.style.resolution, styled.style.resolution)


def test_every_caption_names_the_shapes_left_to_right():
    for i in range(100):
        scene = world.sample_scene("heldout", i)
        for caption in world.captions(scene):
            assert world.parse_caption(caption) == scene.pairs, caption
            assert world.caption_correct(caption, scene)
    assert len(set(world.captions(scene))) == len(world.captions(scene))


def test_caption_correct_needs_every_attribute():
    for i in range(20):
        scene = world.sample_scene("train", i)
        pairs = scene.pairs
        assert world.caption_correct("there is " + world.listing(pairs), scene)
        colour, shape = pairs[0]
        other = next(c for c in world.COLOURS if (c, shape) not in pairs)
        assert not world.caption_correct(world.listing([(other, shape), *pairs[1:]]), scene)
        extra = next(p for p in world.ALL_PAIRS if p not in pairs)
        assert not world.caption_correct(world.listing(pairs + [extra]), scene)
        if len(pairs) > 1:
            assert not world.caption_correct(world.listing(pairs[1:]), scene)


def test_answers_agree_with_the_scene():
    kinds = set()
    for i in range(200):
        scene = world.sample_scene("heldout", i)
        for qa in world.questions(scene, random.Random(i)):
            kinds.add(qa.kind)
            check_answer(scene, qa)
    assert kinds == set(world.QUESTION_KINDS)


def check_answer(scene: world.Scene, qa: world.QA) -> None:
    q, a = qa.question, qa.answer
    if qa.kind == "colour":
        shape = next(s for s in scene.shapes if f"the {s.shape}?" in q or f"the {s.shape} have" in q)
        assert a == shape.colour
    elif qa.kind == "shape":
        assert a in {s.shape for s in scene.shapes if f" {s.colour} " in q or q.endswith(f" {s.colour}?")}
    elif qa.kind == "count":
        named = [s for s in world.SHAPES if f"{s}s" in q]
        n = sum(sh.shape == named[0] for sh in scene.shapes) if named else len(scene.shapes)
        assert a == world.NUMBERS[n]
    elif qa.kind == "yesno":
        said = world.parse_caption(q)
        assert a == ("yes" if said[0] in scene.pairs else "no")
    else:  # position: the two named shapes, in the order asked
        first, second = world.parse_caption(q)
        shapes = {s.pair: s for s in scene.shapes}
        rel = world.relation(shapes[first], shapes[second])
        if a in ("yes", "no"):
            asked = next(r for r, phrase in world._RELATIONS.items() if f" {phrase} " in q)
            assert (a == "yes") == (asked == rel)
        else:
            assert a == rel


def test_held_out_questions_ask_about_the_new_pair_first():
    hits = 0
    for i in range(100):
        scene = world.sample_scene("heldout", i)
        qa = world.QUESTION_MAKERS["colour"](scene, random.Random(i))
        if qa is not None:
            novel = {s.shape for s in scene.shapes if s.pair in world.HELD_OUT}
            hits += any(f"the {shape}" in qa.question for shape in novel)
    assert hits > 50


def test_language_corpus_covers_every_pair_and_its_lines_agree():
    docs = world.text_corpus(1000)
    assert world.HELD_OUT <= {p for doc in docs for line in doc for p in world.parse_caption(line)}
    for doc in docs:
        if doc[0].startswith("a list of shapes: "):
            assert doc == [doc[0], doc[0]]
            continue
        first, again, other, *asked = doc
        assert first == again and world.parse_caption(first) == world.parse_caption(other)  # one scene
        assert asked and all(line.startswith("Question: ") and " Answer: " in line for line in asked)


@pytest.mark.parametrize("index", range(5))
def test_patch_labels_follow_the_shapes(index):
    scene = world.sample_scene("train", index, plain_style=True)
    labels = scene_labels(scene, 64, 8)
    assert labels["patch_colour"].shape == (64,)
    colours = {list(world.COLOURS).index(s.colour) + 1 for s in scene.shapes}
    assert set(labels["patch_colour"][labels["patch_colour"] > 0]) <= colours
    for shape in scene.shapes:  # the patch under each centre belongs to its shape
        patch = int(shape.y) // 8 * 8 + int(shape.x) // 8
        assert labels["patch_shape"][patch] in (0, list(world.SHAPES).index(shape.shape) + 1)
    objects = labels["patch_object"]
    assert set(objects[objects > 0]) == set(range(1, len(scene.shapes) + 1))  # every shape gets a patch
    assert ((objects > 0) == (labels["patch_shape"] > 0)).all()


def test_a_small_shape_across_four_large_patches_is_labelled():
    """With 16-pixel patches a small square on the corner where four meet covers under a fifth of
    each; it still gets the patches it covers most."""
    shape = world.Shape("red", "square", 32.0, 32.0, 11.0, 0.0, world.COLOURS["red"])
    scene = world.Scene((shape,), "plain", False, (240, 240, 240), world.Style())
    labels = scene_labels(scene, 64, 16)
    assert (labels["patch_shape"] == list(world.SHAPES).index("square") + 1).sum() == 4
