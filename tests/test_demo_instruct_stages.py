"""The instruct recipe's stages (`stages`): the parser, the negated share and position's forms, without training."""

import random

import numpy as np
import pytest
import torch

from blip2.demo import instructions, world
from blip2.demo.instruct import (HEAD_ANSWERS, LOOK_QUERIES, HeadTargets, InstructRecipe, StagePairs, head_answers,
                                 look_loss, parse_stages, patch_masks, with_stages)
from blip2.demo.recipe import draw_images


def test_parse_stages_reads_kinds_negation_and_steps():
    stages = parse_stages("exist+exist+colour/plain:800,exist/neg0.2:400@0.0003,all:600")
    assert stages == [(["exist", "exist", "colour"], "plain", 800, None), (["exist"], "neg0.2", 400, 0.0003),
                      (list(instructions.KINDS), "mix", 600, None)]
    assert with_stages(InstructRecipe(stages="exist/plain:800,all:600")).steps == 1400
    assert with_stages(InstructRecipe(stages="")).steps == InstructRecipe().steps  # no stages: steps as set
    assert with_stages(InstructRecipe()).steps == 7400  # the default schedule (`STAGES`)


@pytest.mark.parametrize("bad", ["exits:10", "exist/neg1.5:10", "exist/negx:10", "exist/sometimes:10", "exist", "exist:0",
                                 "exist:10@", "exist:10@fast", "exist:10@0", "exist:10@-1e-3"])
def test_parse_stages_names_the_bad_stage(bad):
    with pytest.raises(ValueError, match="stage"):
        parse_stages("all:5," + bad)


def negated_share(negation: str, kinds: list[str], draws: int = 400) -> tuple[float, list[dict]]:
    data = draw_images(InstructRecipe(image_size=32), "train", 40)
    pairs = StagePairs(data, 1, kinds, negation, 0.1)
    rows = [pairs[i % len(data.scenes)] for i in range(draws)]
    exist = [r for r in rows if r["kind"] in ("exist", "not-exist")]
    return (float(np.mean([r["kind"] == "not-exist" for r in exist])) if exist else float("nan")), rows


def test_negated_share_is_the_stage_s():
    for negation, low, high in (("plain", 0, 0), ("only", 1, 1), ("neg0.2", 0.13, 0.27), ("neg0.5", 0.42, 0.58)):
        share, rows = negated_share(negation, ["exist"])
        assert low <= share <= high, (negation, share)
        assert all(r["fact"] == r["answer"] for r in rows if r["kind"] == "exist")  # plain: the fact is the answer
        assert all(r["fact"] != r["answer"] for r in rows if r["kind"] == "not-exist")  # negated: flipped


def test_stage_asks_only_its_kinds_and_describe_only_if_listed():
    _, rows = negated_share("plain", ["exist", "colour"])
    assert {r["kind"] for r in rows} == {"exist", "colour"}
    _, rows = negated_share("mix", ["count", "describe"])
    assert {r["kind"] for r in rows} == {"count", "describe"}
    assert 0.03 < np.mean([r["kind"] == "describe" for r in rows]) < 0.2  # the recipe's describe share (0.1)


# Position's forms: the stage's share sets the yes/no form as it sets exist's negated phrasings.
def test_position_form_is_the_stage_s():
    directions = set(instructions.RELATIONS)
    for negation, low, high in (("plain", 0, 0), ("only", 1, 1), ("neg0.2", 0.13, 0.27), ("neg0.5", 0.42, 0.58),
                                ("mix", 0.25, 0.42)):  # mix: the templates' share, 2 of 6
        _, rows = negated_share(negation, ["position"])
        assert {r["kind"] for r in rows} <= {"position", "position-yes/no"}
        share = np.mean([r["kind"] == "position-yes/no" for r in rows])
        assert low <= share <= high, (negation, share)
        for r in rows:  # the fact is the true relation in either form; the answer follows from it
            assert r["fact"] in directions, r
            if r["kind"] == "position":
                assert r["answer"] == r["fact"], r
            else:
                assert r["answer"] == ("yes" if instructions.RELATIONS[r["fact"]] in r["prompt"] else "no"), r


def test_exist_and_position_share_a_stage_s_form():
    _, rows = negated_share("plain", ["exist", "position", "colour"])
    assert {r["kind"] for r in rows} == {"exist", "position", "colour"}  # no negated, no yes/no position
    _, rows = negated_share("only", ["exist", "position"])
    assert {r["kind"] for r in rows} == {"not-exist", "position-yes/no"}


def test_a_position_question_s_fact_is_the_scene_s_relation():
    seen = {"direction": 0, "yes": 0, "no": 0}
    for i in range(200):
        scene = world.sample_scene("test", i)
        ins = instructions.instruction(scene, "position", random.Random(i))
        if ins is None:
            continue
        named = [(a, b) for a in scene.shapes for b in scene.shapes for t in instructions.phrasings("position", "seen")
                 for rel in instructions.RELATIONS.values() if a is not b
                 and t.format(a=f"{a.colour} {a.shape}", b=f"{b.colour} {b.shape}", rel=rel) == ins.text]
        assert any(world.relation(a, b) == instructions.fact(ins) for a, b in named), (ins, scene.shapes)
        assert instructions.is_yes_no_position(ins) == (ins.answer in ("yes", "no")) == instructions.is_indirect(ins)
        seen["direction" if ins.answer == ins.relation else ins.answer] += 1
    assert min(seen.values()) > 15, seen


def test_heads_learn_the_relation_and_the_yes_no_answer():
    rows = [{"fact": "left", "answer": "yes"}, {"fact": "above", "answer": "no"}, {"fact": "red", "answer": "red"}]
    batch = HeadTargets(lambda examples: {})(rows)
    assert batch["facts"].tolist() == [HEAD_ANSWERS.index("left"), HEAD_ANSWERS.index("above"), -1]
    assert batch["answers"].tolist() == [HEAD_ANSWERS.index("yes"), HEAD_ANSWERS.index("no"), -1]


def test_patch_masks_mark_the_patches_each_named_shape_covers():
    for i in range(40):
        scene = world.sample_scene("train", i)
        drawn = world.object_map(scene)
        masks = patch_masks(scene, tuple(range(len(scene.shapes))), grid=4)  # (shapes, 17)
        assert masks.shape == (len(scene.shapes), 17) and (masks[:, 0] == 0).all()  # never the class token
        for k, row in enumerate(masks):
            cover = (drawn == k + 1).reshape(4, 16, 4, 16).mean((1, 3)).reshape(-1)
            assert row[1:][cover.argmax()] == 1 and (row[1:][cover == 0] == 0).all()
            assert (row[1:][cover >= 0.1] == 1).all()


def test_look_loss_is_low_when_the_queries_look_at_the_named_shapes():
    looks = torch.zeros(3, 2, 17)
    looks[0, 0, 5], looks[0, 1, 12] = 1, 1  # row 0 names a (token 5) and b (token 12); row 2 names none
    looks[1, 0, 2:4], looks[1, 1, 8] = 1, 1
    right = torch.full((3, 2, 16, 17), 1e-9)
    for row, (a, b) in enumerate(((5, 12), (2, 8), (0, 0))):
        right[row, :, LOOK_QUERIES[0], a] = 1
        right[row, :, LOOK_QUERIES[1], b] = 1
    assert look_loss(right, looks) < 1e-3
    uniform = torch.full((3, 2, 16, 17), 1 / 17, requires_grad=True)
    loss = look_loss(uniform, looks)
    want = -(torch.tensor([1 / 17, 1 / 17, 2 / 17, 1 / 17]).log().mean())
    assert torch.allclose(loss, want)
    loss.backward()
    assert uniform.grad[2].abs().sum() == 0 and uniform.grad[0].abs().sum() > 0  # the unnamed row gives no gradient
    assert look_loss(uniform, torch.zeros(3, 2, 17)) == 0


def test_position_rows_carry_both_named_shapes_patches():
    data = draw_images(InstructRecipe(image_size=32), "train", 40)
    rows = [StagePairs(data, 1, ["position", "colour"], "mix", 0.0, grid=4)[i] for i in range(40)]
    batch = HeadTargets(lambda examples: {})(rows)
    for row, looks in zip(rows, batch["looks"]):
        named = row["looks"] is not None
        assert named == (row["kind"] in ("position", "position-yes/no"))
        assert (looks.sum(-1) > 0).all() if named else looks.sum() == 0


def test_head_answers_are_a_setting_checked_before_training():
    assert head_answers(InstructRecipe()) == HEAD_ANSWERS
    with_numbers = head_answers(InstructRecipe(head_answers=",".join(HEAD_ANSWERS + world.NUMBERS)))
    batch = HeadTargets(lambda examples: {}, with_numbers)([{"fact": "two", "answer": "two"}, {"fact": "red", "answer": "red"},
                                                             {"fact": "yes", "answer": "no"}])
    assert batch["facts"].tolist() == [with_numbers.index("two"), -1, 0] and batch["answers"].tolist() == [8, -1, 1]
    assert HeadTargets(lambda examples: {})([{"fact": "two", "answer": "two"}])["facts"].tolist() == [-1]  # default: no count
    for bad in ("yes", "yes,yes,no", "yes,no,maybe", ""):
        with pytest.raises(ValueError, match="head_answers"):
            head_answers(InstructRecipe(head_answers=bad))
