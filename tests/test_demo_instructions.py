"""The instruction data of the instruction-aware demo (blip2.demo.instructions) and its recipe
(blip2.demo.instruct) at toy size: answers follow from the scene, negations flip them, held-out
phrasings stay out of training, and the recipe writes a checkpoint that loads as InstructBLIP."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from blip2.auto import load_model, load_processor
from blip2.demo import DEMO_DIR, instruct, instructions, world
from blip2.hf_compat import Blip2ForConditionalGeneration
from blip2.instructblip import InstructBlipForConditionalGeneration
from blip2.processing import InstructBlipProcessor
from blip2.retrieval import Blip2ForImageTextRetrieval


def scenes(n: int = 300):
    return [world.sample_scene("test", i) for i in range(n)]


def test_answers_follow_from_the_scene_and_negations_flip_them():
    negated = re.compile(r"\bno\b|\bnot\b|missing|absent")
    seen = {"yes": 0, "no": 0, "negated": 0}
    for i, scene in enumerate(scenes()):
        rng = random.Random(i)
        for wording in instructions.WORDINGS:
            ins = instructions.instruction(scene, "exist", rng, wording)
            thing = re.search(r"(?:an? |no )((?:\w+ )?(?:shape|circle|square|rectangle|triangle))", ins.text).group(1)
            colour, _, shape = thing.rpartition(" ")
            there = any((not colour or c == colour) and (shape == "shape" or s == shape) for c, s in scene.pairs)
            flip = bool(negated.search(ins.text))
            assert ins.answer == ("yes" if there != flip else "no"), (ins, scene.pairs)
            assert instructions.is_negated(ins) == flip and instructions.fact(ins) == ("yes" if there else "no")
            seen[ins.answer] += 1
            seen["negated"] += flip
            count = instructions.instruction(scene, "count", rng, wording)
            assert count.answer in world.NUMBERS
            if count.text in ("how many shapes are there?", "how many things are in the image?"):
                assert count.answer == world.NUMBERS[len(scene.shapes)]
    assert min(seen.values()) > 60  # both answers, and negations, are common


def test_colour_shape_position_and_describe_answers():
    for i, scene in enumerate(scenes(100)):
        rng = random.Random(i)
        for ins in instructions.instructions(scene, rng):
            if ins.kind == "colour":
                shape = next(s for s in world.SHAPES if s in ins.text)
                assert (ins.answer, shape) in scene.pairs
            elif ins.kind == "shape":
                colour = next(c for c in world.COLOURS if re.search(rf"\b{c}\b", ins.text))
                assert (colour, ins.answer) in scene.pairs
            elif ins.kind == "position":
                assert ins.answer in ("left", "right", "above", "below", "yes", "no")
            elif ins.kind == "describe":
                assert world.caption_correct(ins.answer, scene)
                assert instructions.is_right(ins, "there are " + ins.answer + ".", scene)


def test_unseen_wordings_are_not_trained_and_prompts_match_the_commands():
    for kind in instructions.KINDS:
        assert not set(instructions.phrasings(kind, "seen")) & set(instructions.phrasings(kind, "unseen"))
    question = instructions.Instruction("colour", "what colour is the circle?", "red")
    assert question.prompt == "Question: what colour is the circle? Answer:"  # OPT's template, as `blip2 ask` sends
    from blip2.commands import INSTRUCT_CAPTION_PROMPT

    assert instructions.CAPTION_PROMPT == INSTRUCT_CAPTION_PROMPT  # `blip2 caption`'s instruction is trained on
    assert instructions.Instruction("describe", instructions.CAPTION_PROMPT, "x").prompt == INSTRUCT_CAPTION_PROMPT
    assert instructions.normalise(" Yes. ") == "yes"


def test_answer_words_are_words_of_the_language_model():
    """Every one-word answer but "zero" is one token of the frozen LM, and all appear in its reading."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO_DIR / "model" / "tokenizer.json"))
    words = ["yes", "no", "one", "two", "three", "left", "right", "above", "below", *world.COLOURS, *world.SHAPES]
    for word in words:
        assert len(tok.encode(" " + word).ids) == 2, word  # BOS + the word


TOY = replace(instruct.QUICK, train_images=32, steps=2, batch=8, eval_per_kind=2, eval_scenes=4,
              fact_head_weight=0.5, answer_head_weight=0.25, look_weight=0.5)


def test_heads_read_only_rows_with_a_yes_no_or_direction_target():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, len(instruct.HEAD_ANSWERS))
    queries = torch.randn(3, 2, 4)  # (B, Q, D)
    loss, acc = instruct.head_loss(head, queries, torch.tensor([-1, 2, -1]))
    want = torch.nn.functional.cross_entropy(head(queries[1:2].mean(1)), torch.tensor([2]))
    assert torch.allclose(loss, want) and acc in (0.0, 1.0)
    loss, acc = instruct.head_loss(head, queries, torch.tensor([-1, -1, -1]))
    assert loss == 0 and torch.isnan(acc)
    batch = instruct.HeadTargets(lambda examples: {})(
        [{"fact": "yes", "answer": "no"}, {"fact": "red", "answer": "red"}, {"fact": "left", "answer": "left"}])
    assert batch["facts"].tolist() == [0, -1, 2] and batch["answers"].tolist() == [1, -1, 2]


def test_a_second_continuation_reports_every_run(tmp_path):
    """1500 steps, continued for 1500, then for 1200: 4200 steps and every run's minutes in all."""
    first = {"settings": {"steps": 1500}, "minutes": 20.0, "continued_from": None}
    (tmp_path / "instruct_scores.json").write_text(json.dumps(first))
    second = {"settings": {"steps": 1500}, "minutes": 25.0, "continued_from": instruct.earlier_run(tmp_path / "instruct")}
    assert second["continued_from"] == {"steps": 1500, "minutes": 20.0, "runs": 1}
    (tmp_path / "instruct_scores.json").write_text(json.dumps(second))
    third = {"settings": {"steps": 1200}, "minutes": 10.0, "continued_from": instruct.earlier_run(tmp_path / "instruct")}
    assert third["continued_from"] == {"steps": 3000, "minutes": 45.0, "runs": 2}
    line = " ".join(instruct.continued(third))
    assert "2 earlier runs" in line and "4200 steps and 55.0 minutes in all" in line
    legacy = dict(second, continued_from={"steps": 1500, "minutes": 20.0})  # written before runs were counted
    (tmp_path / "instruct_scores.json").write_text(json.dumps(legacy))
    assert instruct.earlier_run(tmp_path / "instruct") == {"steps": 3000, "minutes": 45.0, "runs": 2}
    assert instruct.continued({"continued_from": None}) == []


def test_a_continuation_without_the_ablation_reports_the_earlier_one(tmp_path):
    """The ablation trains from BLIP-2, not from the run continued, so a continuation that skips it
    (`ablation=false`) reports the last one trained in its chain, labelled as such, and passes it on."""
    cells = {"test/seen": {"colour": 0.62, "yes/no": 0.43}}
    first = {"settings": {"steps": 1500, "ablation_steps": 500}, "minutes": 20.0, "continued_from": None,
             "vqa": {"instruct": cells, "hidden": cells}}
    (tmp_path / "instruct_scores.json").write_text(json.dumps(first))
    second = {"settings": {"steps": 1200, "ablation_steps": 0}, "minutes": 10.0, "vqa": {"instruct": cells},
              "continued_from": instruct.earlier_run(tmp_path / "instruct")}
    assert second["continued_from"]["ablation"] == {"steps": 500, "vqa": cells}
    (tmp_path / "instruct_scores.json").write_text(json.dumps(second))
    third = instruct.earlier_run(tmp_path / "instruct")
    assert third["ablation"] == {"steps": 500, "vqa": cells} and third["steps"] == 2700 and third["runs"] == 2
    assert "ablation" not in instruct.earlier_run(tmp_path / "nowhere" / "instruct")
    report = instruct.report({**second, "settings": {**dict(asdict(instruct.InstructRecipe()), steps=1200,
                                                            ablation=False, ablation_steps=0)},
                              "threads": 2, "load": "1.0", "size_mb": 6.7, "stages_s": {},
                              "captions": {s: {"blip2": 0.9, "instruct": 0.9} for s in ("test", "heldout")},
                              "validation_captions": {"blip2": 0.9, "instruct": 0.9}, "captioner": "instruct"}, False)
    assert "| ablation: 500 steps from BLIP-2" in report and "(an earlier run of this chain) | test | seen | 62.0%" in report


@pytest.mark.skipif(not (DEMO_DIR / "model" / "config.json").is_file(), reason="needs the shipped BLIP-2 demo model")
def test_toy_recipe_writes_an_instructblip_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "REPORT.md").write_text("# the BLIP-2 part\n", encoding="utf-8")
    scores = instruct.run(TOY, DEMO_DIR, out, tmp_path / "work", quick=True)
    assert set(scores["vqa"]) == {"blip2", "instruct", "hidden"}
    assert set(scores["vqa"]["instruct"]) == {"test/seen", "test/unseen", "heldout/seen", "heldout/unseen"}
    assert set(scores["vqa"]["instruct"]["test/seen"]) == set(instructions.KINDS)
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# the BLIP-2 part\n") and report.count(instruct.MARKER) == 1
    assert "--set fact_head_weight=0.5 --set answer_head_weight=0.25 --set look_weight=0.5" in report  # as run
    assert "A loss on the last cross-attention (weight 0.5)" in report
    instruct.write_report(out, instruct.report(scores, True))  # a rerun replaces its section
    assert (out / "REPORT.md").read_text() == report

    folder = out / instruct.INSTRUCT_DIR_NAME
    model, processor = load_model(folder), load_processor(folder)
    assert isinstance(model, InstructBlipForConditionalGeneration) and isinstance(processor, InstructBlipProcessor)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # the heads trained beside it do not ship
        assert not [k for k in f.keys() if "head" in k and "lm_head" not in k]
    image = world.example("test", 0).image
    inputs = processor(images=image, text="Question: what colour is the circle? Answer:", return_tensors="pt")
    assert inputs["qformer_input_ids"].shape[1] > 5
    with torch.inference_mode():
        assert model.generate(**inputs, max_new_tokens=3).shape[0] == 1
    shutil.rmtree(tmp_path / "work", ignore_errors=True)


def test_no_opening_of_the_seen_phrasings_decides_the_answer_type():
    """Questions that open like yes/no ones ("can you", "do you", "tell me") also ask for a word, and
    the reverse, so a model cannot learn the answer's type from the first words alone."""
    yes_no = [t for t in instructions.phrasings("exist", "seen")]
    words = [t for k in ("colour", "shape", "count") for t in instructions.phrasings(k, "seen")]
    for opening in ("can you", "do you", "tell me"):
        assert any(t.startswith(opening) for t in yes_no) and any(t.startswith(opening) for t in words), opening


def test_a_count_of_one_kind_has_the_existence_fact_inside_it():
    """"How many circles?" asks "is there a circle?" too: its fact is yes unless the count is zero;
    a count of every shape has no such question inside it and keeps its answer as its fact."""
    facts = {"one kind": set(), "every shape": set()}
    for i, scene in enumerate(scenes()):
        rng = random.Random(1000 + i)
        for wording in instructions.WORDINGS:
            ins = instructions.instruction(scene, "count", rng, wording)
            named = re.search(
                r"how many (\w+) (?:shapes|objects)|(\w+)s (?:are|do|there)|the (\w+)s\.|number of (\w+)s", ins.text)
            word = next((g for g in named.groups() if g), "") if named else ""
            one_kind = word in world.SHAPES or word in world.COLOURS
            assert ins.one_kind == one_kind, ins
            if one_kind:
                n = sum(word in (c, s) for c, s in scene.pairs)
                assert ins.answer == world.NUMBERS[n], (ins, scene.pairs)
                assert instructions.fact(ins) == ("yes" if n else "no"), (ins, scene.pairs)
                facts["one kind"].add(instructions.fact(ins))
            else:
                assert instructions.fact(ins) == ins.answer == world.NUMBERS[len(scene.shapes)]
                facts["every shape"].add(ins.answer)
    assert facts["one kind"] == {"yes", "no"} and len(facts["every shape"]) >= 2


@pytest.mark.skipif(not (DEMO_DIR / "model" / "config.json").is_file(), reason="needs the shipped BLIP-2 demo model")
def test_the_shapes_plurals_start_from_their_singulars():
    """Stage 1's captions never say "circles", so the Q-Former's row for it is still random; the
    instruct model made from BLIP-2 reads a plural as its singular until tuning says otherwise."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO_DIR / "model" / "tokenizer.json"))
    caption_tokens = {t for i in range(200) for c in world.captions(world.example("train", i).scene)
                      for t in tok.encode(c, add_special_tokens=False).ids}
    blip2 = Blip2ForConditionalGeneration.from_pretrained(DEMO_DIR / "model")
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(DEMO_DIR / "retrieval")
    model = instruct.from_blip2(blip2, retrieval, 64, tok)
    table, before = model.qformer.embeddings.word.weight, retrieval.embeddings.word.weight
    for shape in world.SHAPES:
        (one,), (many,) = (tok.encode(w, add_special_tokens=False).ids for w in (f" {shape}", f" {shape}s"))
        assert one in caption_tokens and many not in caption_tokens  # why the copy is needed
        assert torch.equal(table[many], table[one]) and torch.equal(table[one], before[one].float())
        assert not torch.allclose(before[many].float(), before[one].float())
    kept = tok.encode(" shapes", add_special_tokens=False).ids  # any other row is stage 1's
    assert torch.equal(table[kept[0]], before[kept[0]].float())
