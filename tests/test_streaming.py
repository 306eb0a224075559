"""Streaming text while generating: iterator across threads, callback, errors, multi-byte text."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from blip2.generation import (CallbackStreamer, GenerationConfig, TextIteratorStreamer, generate,
                              run_in_thread)

WORDS = ["<pad>", "<s>", "</s>", "a", "photo", "of", "cat", "dog", "on", "the", "beach", "\n", "ing"]
EOS = 2


def decode(ids, skip_special_tokens=False):
    """Word-level decode; "ing" glues to the word before it, so earlier text can change."""
    out = ""
    for i in ids:
        word = WORDS[i]
        if skip_special_tokens and word.startswith("<"):
            continue
        if word == "ing" or word == "\n" or not out or out.endswith("\n"):
            out += word
        else:
            out += " " + word
    return out


class Scripted:
    """A stepper that makes the given tokens the argmax, one per step; can pause before a step."""

    def __init__(self, tokens, vocab=len(WORDS), pause_at=None):
        self.tokens, self.vocab, self.n = tokens, vocab, 0
        self.pause_at, self.gate = pause_at, threading.Event()

    def _logits(self):
        logits = torch.zeros(1, self.vocab)
        logits[0, self.tokens[self.n]] = 10.0
        self.n += 1
        return logits

    def prefill(self):
        return self._logits()

    def step(self, tokens):
        if self.n == self.pause_at:
            assert self.gate.wait(10), "the reader never released the generator"
        return self._logits()

    def select(self, index):
        assert index.numel() == 1


def run(stepper, streamer=None, **kwargs):
    config = GenerationConfig(**{"eos_token_id": EOS, "pad_token_id": 0, "max_new_tokens": 20, **kwargs})
    return generate(stepper, torch.ones(1, 1, dtype=torch.long), config, streamer=streamer)


SCRIPT = [3, 4, 5, 9, 6, 12, 8, 9, 10, 11, 3, 7, EOS]


def test_iterator_from_a_thread_yields_the_whole_text_in_pieces():
    streamer = TextIteratorStreamer(decode, skip_special_tokens=True)
    thread = run_in_thread(lambda streamer: run(Scripted(SCRIPT), streamer), streamer)
    pieces = list(streamer)
    thread.join(10)
    assert "".join(pieces) == decode(SCRIPT, skip_special_tokens=True)
    assert len(pieces) > 3  # released as it goes, not all at the end
    assert "catting" not in "".join(pieces) and any("ing" in p for p in pieces)


def test_streaming_does_not_change_the_tokens():
    streamer = CallbackStreamer(decode, lambda piece, final: None)
    assert torch.equal(run(Scripted(SCRIPT), streamer), run(Scripted(SCRIPT)))


def test_pieces_arrive_before_generation_ends():
    stepper = Scripted(SCRIPT, pause_at=8)
    streamer = TextIteratorStreamer(decode, timeout=10)
    thread = run_in_thread(lambda streamer: run(stepper, streamer), streamer)
    first = next(streamer)  # arrives while the generator is held at step 8 at the latest
    assert first and stepper.n <= 8 and thread.is_alive()
    stepper.gate.set()
    rest = list(streamer)
    thread.join(10)
    assert first + "".join(rest) == decode(SCRIPT)


def test_callback_gets_pieces_then_one_final_call():
    calls = []
    run(Scripted(SCRIPT), CallbackStreamer(decode, lambda piece, final: calls.append((piece, final)),
                                           skip_special_tokens=True))
    assert [final for _, final in calls].count(True) == 1 and calls[-1][1]
    assert "".join(piece for piece, _ in calls) == decode(SCRIPT, skip_special_tokens=True)


def test_errors_in_the_generating_thread_reach_the_reader():
    streamer = TextIteratorStreamer(decode, timeout=10)

    def broken(streamer):
        raise RuntimeError("model exploded")

    run_in_thread(broken, streamer)
    with pytest.raises(RuntimeError, match="model exploded"):
        list(streamer)


def test_timeout_raises_queue_empty():
    streamer = TextIteratorStreamer(decode, timeout=0.05)
    with pytest.raises(queue.Empty):
        next(streamer)


def test_streaming_needs_one_row():
    config = GenerationConfig(max_new_tokens=3, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="one sequence"):
        generate(Scripted(SCRIPT), torch.ones(1, 1, dtype=torch.long), config,
                 streamer=TextIteratorStreamer(decode))


def test_multibyte_characters_are_never_split():
    """A byte-level BPE tokenizer splits 'é' or '☕' over tokens; no piece may hold half a character."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet)
    tok.train_from_iterator(["a cat on the beach", "the dog"], trainer)
    text = "a café ☕ on the beach, naïve cat\nthe dog 🐕 ran"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))  # the hazard is real
    pieces = []
    streamer = CallbackStreamer(tok.decode, lambda piece, final: pieces.append(piece))
    eos = next(i for i in range(tok.get_vocab_size()) if i not in ids)
    run(Scripted(ids + [eos], vocab=tok.get_vocab_size()), streamer, eos_token_id=eos, max_new_tokens=len(ids) + 3)
    assert "".join(pieces) == tok.decode(ids + [eos])
    assert not any("\ufffd" in piece for piece in pieces)
