"""A model over an evaluation set: captions, answers and retrieval similarities, then the metrics.

The same functions serve `blip2 eval` (images through the checkpoint's processor) and the
trainer's evaluation (images through the training transform): they take the image loader and
the text codec as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..families import family_of
from .data import EvalSet
from .retrieval import recall_at_k
from .vqa import vqa_accuracy

# chunks of image paths -> one (B, 3, H, W) per chunk, in order (a loader may decode the next ones ahead)
LoadImages = Callable[[list[list[str]]], Iterator[Tensor]]


class TextCodec:
    """Prompts -> padded ids and mask; texts -> right-padded ones; ids -> stripped text.

    From a model folder's tokenizer (`blip2.processing`) or a bare tokenizer.json."""

    def __init__(self, path: str | Path, pad_id: int | None = None) -> None:
        path = Path(path)
        if path.is_dir() and (path / "tokenizer_config.json").is_file():
            from ..processing import Tokenizer

            self._tok = Tokenizer.from_pretrained(path)
            self._encode = lambda texts: list(self._tok(texts)["input_ids"])
            self._decode = lambda ids: self._tok.batch_decode(ids, skip_special_tokens=True)
            self.pad_id = self._tok.pad_token_id if pad_id is None else pad_id
        else:
            from tokenizers import Tokenizer as FileTokenizer

            tok = FileTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
            self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts)]
            self._decode = lambda ids: tok.decode_batch(ids, skip_special_tokens=True)
            self.pad_id = (tok.token_to_id("<pad>") or 0) if pad_id is None else pad_id
        self.pad_id = self.pad_id or 0

    def prompts(self, prompts: list[str], left: bool = True) -> tuple[Tensor, Tensor]:
        """Padded on the left (a decoder's next token comes last) or the right (an encoder's input)."""
        seqs = [list(s) for s in self._encode(prompts)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            where = slice(T - len(s), T) if left else slice(0, len(s))
            if s:
                ids[i, where] = torch.tensor(s)
                mask[i, where] = 1
        return ids, mask

    def right_padded(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        from ..train.data import pad

        seqs = [list(s) for s in self._encode(texts)]
        return pad(seqs, self.pad_id, min(max_len, max(len(s) for s in seqs)))

    def decode(self, ids: Tensor) -> list[str]:
        return [t.strip() for t in self._decode(ids.tolist())]


@dataclass
class EvalSettings:
    prompt: str = ""  # captions continue this text
    question_template: str = "Question: {} Answer:"
    batch_size: int = 16
    max_images: int = 0  # 0: all
    caption_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 30})
    vqa_kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 10})
    java: bool | None = None  # METEOR and the PTB tokenizer (None: when Java is installed)
    samples: int = 8  # (image, caption) pairs kept for looking at


@torch.no_grad()
def generate_texts(model, load: LoadImages, codec: TextCodec, paths: list[str], prompts: list[str],
                   batch_size: int, **kwargs) -> list[str]:
    """One generated text per (image, prompt) pair."""
    out = []
    device, dtype = model.device, model.dtype
    starts = range(0, len(paths), batch_size)
    for start, pixels in zip(starts, load([paths[s:s + batch_size] for s in starts])):
        pixels = pixels.to(device, dtype)
        batch_prompts = prompts[start:start + batch_size]
        ids = mask = None
        if any(batch_prompts):
            left = family_of(model.config).decoder_only
            ids, mask = (t.to(device) for t in codec.prompts(batch_prompts, left))
        new = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                             **_within_positions(model.config, 0 if ids is None else ids.shape[1], kwargs))
        out += codec.decode(new)
    return out


def _within_positions(config, prompt_len: int, kwargs: dict) -> dict:
    """max_new_tokens lowered to what a language model with learned positions has room for."""
    if not family_of(config).learned_positions or "max_new_tokens" not in kwargs:
        return kwargs
    room = config.text_config.max_position_embeddings - config.num_query_tokens - prompt_len
    return {**kwargs, "max_new_tokens": max(1, min(kwargs["max_new_tokens"], room))}


def _limit(indices: list[int], settings: EvalSettings) -> list[int]:
    return indices[: settings.max_images] if settings.max_images else indices


def caption_results(model, load: LoadImages, codec: TextCodec, ev: EvalSet, settings: EvalSettings) -> dict:
    """{"metrics": caption metrics, "predictions": [{"image", "caption", "references"}]}."""
    from .captions import caption_metrics

    keep = _limit(ev.captioned(), settings)
    paths = [ev.images[i] for i in keep]
    texts = generate_texts(model, load, codec, paths, [settings.prompt] * len(keep), settings.batch_size,
                           **settings.caption_kwargs)
    metrics = caption_metrics(dict(zip(keep, texts)), {i: ev.captions[i] for i in keep}, java=settings.java)
    metrics["n"] = len(keep)
    predictions = [{"image": ev.images[i], "caption": t, "references": ev.captions[i]} for i, t in zip(keep, texts)]
    return {"metrics": metrics, "predictions": predictions}


def vqa_results(model, load: LoadImages, codec: TextCodec, ev: EvalSet, settings: EvalSettings) -> dict:
    questions = ev.questions[: settings.max_images] if settings.max_images else ev.questions
    # replace, not format: other braces in a template are text, never a format field
    prompts = [settings.question_template.replace("{}", q.question) for q in questions]
    answers = generate_texts(model, load, codec, [ev.images[q.image] for q in questions], prompts,
                             settings.batch_size, **settings.vqa_kwargs)
    metrics = vqa_accuracy(answers, [q.answers for q in questions])
    predictions = [{"image": ev.images[q.image], "question": q.question, "answer": a, "answers": q.answers}
                   for q, a in zip(questions, answers)]
    return {"metrics": metrics, "predictions": predictions}


@torch.no_grad()
def retrieval_results(model, load: LoadImages, tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
                      ev: EvalSet, settings: EvalSettings) -> dict:
    """ITC similarities of every captioned image with every caption -> recall@1/5/10 both ways."""
    keep = _limit(ev.captioned(), settings)
    device, dtype = model.device, model.dtype
    image_feats = []
    chunks = [[ev.images[i] for i in keep[s:s + settings.batch_size]] for s in range(0, len(keep), settings.batch_size)]
    for pixels in load(chunks):
        image = model.vision_model(pixels.to(device, dtype)).last_hidden_state
        image_feats.append(model.image_embeds(model.image_queries(image).last_hidden_state).float())  # (B, Q, E)
    texts = [(n, c) for n, i in enumerate(keep) for c in ev.captions[i]]
    text_feats = []
    for start in range(0, len(texts), settings.batch_size):
        ids, mask = tokenize([c for _, c in texts[start:start + settings.batch_size]])
        states = model.text_states(ids.to(device), mask.to(device)).last_hidden_state
        text_feats.append(model.text_embeds(states).float())  # (B, E)
    images, captions = torch.cat(image_feats), torch.cat(text_feats)
    # ITC: an image's similarity to a text is its best query's
    similarity = torch.einsum("iqe,te->iqt", images, captions).max(dim=1).values  # (images, texts)
    metrics = recall_at_k(similarity.cpu(), [n for n, _ in texts])
    metrics["n"] = len(keep)
    return {"metrics": metrics, "predictions": []}
