"""Evaluation metrics: caption scores against pycocoevalcap's own pipeline, VQA accuracy against
the official VQAv2 rules (worked by hand), retrieval recall, and the evaluation-set readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip2.evaluation.captions import caption_metrics, java_available, ptb_tokenize, tokenize
from blip2.evaluation.data import read_eval_set
from blip2.evaluation.retrieval import recall_at_k
from blip2.evaluation.vqa import answer_score, normalise_answer, vqa_accuracy

COCO = Path(__file__).parent / "fixtures" / "coco_captions"
needs_java = pytest.mark.skipif(not java_available(), reason="no Java: the PTB tokenizer and METEOR need it")


def coco_example():
    """gts / res as COCOEvalCap.evaluate gathers them, through pycocotools."""
    from pycocotools.coco import COCO as CocoApi

    coco = CocoApi(str(COCO / "captions_val2014.json"))
    result = coco.loadRes(str(COCO / "captions_val2014_fakecap_results.json"))
    ids = result.getImgIds()
    return {i: coco.imgToAnns[i] for i in ids}, {i: result.imgToAnns[i] for i in ids}


def reference_scores(gts: dict, res: dict) -> dict:
    """pycocoevalcap's scorers on already tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-4": bleu[3], "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}


# ---------------------------------------------------------------- captions
def test_caption_metrics_equal_pycocoevalcap_on_the_example_data():
    gts, res = coco_example()
    ev = read_eval_set(COCO / "captions_val2014.json")  # the same file through our reader
    refs = {k: ev.captions[n] for n, k in enumerate_ids(gts)}
    preds = {k: res[k][0]["caption"] for k in gts}
    ours = caption_metrics(preds, refs, java=False)
    tokenised = {k: [ptb_tokenize(a["caption"]) for a in v] for k, v in gts.items()}
    theirs = reference_scores(tokenised, {k: [ptb_tokenize(v[0]["caption"])] for k, v in res.items()})
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert 0.2 < ours["BLEU-4"] < 1 and ours["CIDEr"] > 0.5  # the captions are close to their references
    assert "METEOR" not in ours and "SPICE" not in ours  # no Java asked for


def enumerate_ids(gts: dict):
    return enumerate(sorted(gts))  # the fixture's images are listed in id order


def test_scores_fall_for_wrong_captions():
    gts, res = coco_example()
    refs = {k: [a["caption"] for a in v] for k, v in gts.items()}
    good = caption_metrics({k: v[0]["caption"] for k, v in res.items()}, refs, java=False)
    shuffled = dict(zip(sorted(res), [res[k][0]["caption"] for k in sorted(res)][1:] + [res[min(res)][0]["caption"]]))
    bad = caption_metrics(shuffled, refs, java=False)
    assert all(bad[m] < good[m] for m in ("BLEU-4", "ROUGE-L", "CIDEr"))


def test_python_tokenizer_follows_the_ptb_rules():
    assert ptb_tokenize("The dog's ball isn't red; it's blue...") == "the dog 's ball is n't red it 's blue"
    assert ptb_tokenize("Two dogs (brown) playing!") == "two dogs -lrb- brown -rrb- playing"
    assert ptb_tokenize('"Hi," she said at 3:30 p.m. -- 1,200 feet') == "hi she said at 3:30 p.m. 1,200 feet"
    assert ptb_tokenize("I cannot see a black-and-white bar/cafe") == "i can not see a black-and-white bar/cafe"


@needs_java
def test_python_tokenizer_equals_the_java_ptb_tokenizer():
    gts, _ = coco_example()
    sentences = [a["caption"] for v in gts.values() for a in v] + ['"Hi," she said at 3:30 p.m. -- Mr. Smith\'s U.S. car']
    java = tokenize({n: [s] for n, s in enumerate(sentences)}, java=True)
    assert [ptb_tokenize(s) for s in sentences] == [java[n][0] for n in range(len(sentences))]


@needs_java
def test_with_java_the_numbers_are_cocoevalcaps(monkeypatch):
    """COCOEvalCap.evaluate itself, with the Java PTB tokenizer. SPICE is left out (it downloads
    models) and METEOR stubbed on both sides (its JVM takes half a minute to load)."""
    import pycocoevalcap.eval as coco_eval
    import pycocoevalcap.meteor.meteor as meteor

    def stub(name):
        class Stub:
            def compute_score(self, gts, res):
                return 0.5, [0.5] * len(gts)

            def method(self):
                return name

        return Stub

    monkeypatch.setattr(coco_eval, "Spice", stub("SPICE"))
    monkeypatch.setattr(coco_eval, "Meteor", stub("METEOR"))
    monkeypatch.setattr(meteor, "Meteor", stub("METEOR"))
    from pycocotools.coco import COCO as CocoApi

    coco = CocoApi(str(COCO / "captions_val2014.json"))
    result = coco.loadRes(str(COCO / "captions_val2014_fakecap_results.json"))
    evaluator = coco_eval.COCOEvalCap(coco, result)
    evaluator.params["image_id"] = result.getImgIds()
    evaluator.evaluate()
    gts, res = coco_example()
    ours = caption_metrics({k: v[0]["caption"] for k, v in res.items()}, {k: [a["caption"] for a in v] for k, v in gts.items()},
                           java=True, spice=False)
    names = {"Bleu_1": "BLEU-1", "Bleu_4": "BLEU-4", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    for theirs, mine in names.items():
        assert ours[mine] == pytest.approx(evaluator.eval[theirs], abs=1e-12), mine


def test_caption_metrics_reject_mismatched_keys():
    with pytest.raises(ValueError, match="no prediction for \\[2\\]"):
        caption_metrics({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]}, java=False)


# ---------------------------------------------------------------- VQA
def test_vqa_normalisation_follows_the_official_rules():
    assert normalise_answer("Two.") == "2"  # period dropped, number word to digit
    assert normalise_answer("  The Dog\n") == "dog"  # article dropped, lower case, whitespace
    assert normalise_answer("an apple") == "apple"
    assert normalise_answer("dont") == "don't" and normalise_answer("isnt") == "isn't"  # contractions
    assert normalise_answer("yes!") == "yes"  # touching the end: removed
    assert normalise_answer("black/white") == "black white"  # no space beside it: a space instead
    assert normalise_answer("black / white") == "black white"
    assert normalise_answer("1,000") == "1000"  # digit-comma-digit: commas removed, not spaced
    assert normalise_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalise_answer("none") == "0"


def test_vqa_soft_accuracy_over_ten_answers():
    # Each answer left out in turn: min(1, matches among the other nine / 3), averaged.
    answers = ["2"] * 2 + ["3"] * 8
    # for the two "2"s: 1 match among the others -> 1/3; for the eight "3"s: 2 matches -> 2/3
    assert answer_score("Two.", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert answer_score("three", answers) == pytest.approx(1.0)  # 7 or 8 matches: always capped at 1
    three = ["red"] * 3 + ["pink"] * 7
    # "red" left out: 2 others match -> 2/3 (three times); a "pink" left out: 3 match -> 1 (seven times)
    assert answer_score("Red", three) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert answer_score("blue", three) == 0.0
    assert answer_score("yes", ["yes"] * 10) == 1.0


def test_vqa_single_answer_is_exact_match_after_normalisation():
    assert answer_score("The two", ["2"]) == 1.0
    assert answer_score("2 dogs", ["two"]) == 0.0
    result = vqa_accuracy(["yes", "no", "a cat"], [["yes"], ["yes"], ["cat"]])
    assert result == {"vqa_accuracy": pytest.approx(2 / 3), "n": 3}


# ---------------------------------------------------------------- retrieval
def test_recall_at_k_both_directions():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, text 3 to image 2
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],
                        [0.2, 0.3, 0.1, 0.8],  # image 1's own text (2) ranks last of four
                        [0.1, 0.0, 0.2, 0.7]])
    r = recall_at_k(sim, [0, 0, 1, 2], ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(2 / 3)  # images 0 and 2 find a text of theirs first
    assert r["i2t_r2"] == pytest.approx(2 / 3) and r["i2t_r5"] == 1.0
    # text 0 -> image 0 first; text 1 -> image 1 first (0.3), its own second; text 2 -> image 0 first;
    # text 3 -> image 1 first, its own second
    assert r["t2i_r1"] == pytest.approx(1 / 4) and r["t2i_r2"] == pytest.approx(3 / 4)
    assert r["t2i_r5"] == 1.0


# ---------------------------------------------------------------- evaluation sets
def test_eval_sets_from_coco_jsonl_and_json_lists(tmp_path):
    ev = read_eval_set(COCO / "captions_val2014.json", image_root=tmp_path)
    assert len(ev.images) == 5 and all(len(c) == 5 for c in ev.captions)
    assert ev.images[0] == str(tmp_path / "COCO_val2014_000000000001.jpg") and ev.tasks == ["caption", "retrieval"]
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "caption": ["one", "two"]}) + "\n"
                     + json.dumps({"image": "a.png", "question": "what?", "answer": ["x"] * 9 + ["y"]}) + "\n")
    ev = read_eval_set(jsonl)
    assert ev.captions == [["one", "two"]] and ev.questions[0].answers == ["x"] * 9 + ["y"]
    assert ev.tasks == ["caption", "retrieval", "vqa"]
    lavis = tmp_path / "test.json"
    lavis.write_text(json.dumps([{"image": "b.png", "caption": ["c1", "c2"]}]))
    assert read_eval_set(lavis).captions == [["c1", "c2"]]


def test_bad_eval_inputs_name_the_file_and_line(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"data\.csv: unknown evaluation format '\.csv'"):
        read_eval_set(csv)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match=r"other\.json: unknown evaluation format"):
        read_eval_set(other)
    no_caption = tmp_path / "val.jsonl"
    no_caption.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + json.dumps({"image": "b.png"}) + "\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:2: a record needs a 'caption'"):
        read_eval_set(no_caption)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png",\n "caption": }]')
    with pytest.raises(ValueError, match=r"broken\.json:2: not JSON"):
        read_eval_set(broken)


def test_vqav2_annotation_and_question_files(tmp_path):
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["2"] * 7 + ["3"] * 3)]
    annotations.write_text(json.dumps({"data_subtype": "val2014", "annotations": [
        {"question_id": 11, "image_id": 42, "answers": answers, "question_type": "how many", "answer_type": "number"},
        {"question_id": 12, "image_id": 42, "answers": [{"answer": "yes", "answer_id": 1}] * 10}]}))
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 11, "image_id": 42, "question": "How many?"},
                                                   {"question_id": 12, "image_id": 42, "question": "Is it?"}]}))
    ev = read_eval_set(annotations, tmp_path / "val2014", questions)
    assert ev.images == [str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert [q.question for q in ev.questions] == ["How many?", "Is it?"] and ev.questions[0].answers[-1] == "3"
    assert ev.tasks == ["vqa"]
    assert vqa_accuracy(["two", "yes"], [q.answers for q in ev.questions])["vqa_accuracy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pass its questions file too"):
        read_eval_set(annotations)
