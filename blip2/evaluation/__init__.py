"""Scoring models the way the papers do, and `blip2 eval`.

- captions.py: BLEU, METEOR, ROUGE-L, CIDEr, SPICE through pycocoevalcap (the `eval` extra)
- vqa.py: VQAv2 answer normalisation and the soft accuracy over ten answers
- retrieval.py: recall@1/5/10 from a similarity matrix, both directions
- data.py: evaluation sets: JSONL or folders like training data, COCO caption files
- predict.py: a model over an evaluation set -> predictions -> metrics (also what the trainer calls)
- cli.py: `blip2 eval`
"""
