"""The instruct recipe's stages (`stages`): the parser and the negated share, without training."""

import numpy as np
import pytest

from blip2.demo import instructions
from blip2.demo.instruct import InstructRecipe, StagePairs, parse_stages, with_stages
from blip2.demo.recipe import draw_images


def test_parse_stages_reads_kinds_negation_and_steps():
    stages = parse_stages("exist+exist+colour/plain:800,exist/neg0.2:400,all:600")
    assert stages == [(["exist", "exist", "colour"], "plain", 800), (["exist"], "neg0.2", 400),
                      (list(instructions.KINDS), "mix", 600)]
    assert with_stages(InstructRecipe(stages="exist/plain:800,all:600")).steps == 1400
    assert with_stages(InstructRecipe()).steps == InstructRecipe().steps  # no stages: steps as set


@pytest.mark.parametrize("bad", ["exits:10", "exist/neg1.5:10", "exist/negx:10", "exist/sometimes:10", "exist", "exist:0"])
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
