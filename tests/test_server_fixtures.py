"""Helpers for the server tests: tiny random checkpoints (captioning and retrieval) written as real
checkpoint folders, an engine over them, and a uvicorn server on a free loopback port in a thread.

No tests live here; the server test modules import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import torch
from PIL import Image

WORDS = ("a red blue green yellow circle square triangle star left right of above below the on "
         "big small two three one and with picture photo shape shapes background dark light is there "
         "how many what colour yes no").split()
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0-3; </s> is both BOS and EOS
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
IMAGE_SIZE = 16
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------- checkpoints
def _word_tokenizer(specials: tuple[str, ...], template: str, template_tokens: list[str]):
    """A word-level tokenizer: every word one token, decoded by joining with spaces (readable captions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(list(specials) + list(WORDS))}
    unk = "<unk>" if "<unk>" in vocab else "[UNK]"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template_tokens]
    )
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_processor_files(folder: Path, tok, special: dict, tokenizer_class: str) -> None:
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {**special, "tokenizer_class": tokenizer_class,
                                                   "model_max_length": 512, "processor_class": "Blip2Processor"})
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
        "do_resize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": MEAN, "image_std": STD, "do_convert_rgb": True,
    })


@torch.no_grad()
def _redraw(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Spread-out random weights, so greedy decoding has clear winners and captions are not all one word."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * std
        param.copy_(1.0 + noise if (name.endswith("weight") and param.dim() == 1) else noise)


def _tiny_config(text_vocab: int, qformer_vocab: int, retrieval: bool):
    from blip2 import Blip2Config

    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=4)
    qformer = dict(vocab_size=qformer_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=40, cross_attention_frequency=1, encoder_hidden_size=32,
                   max_position_embeddings=64, use_qformer_text_input=retrieval)
    text = dict(model_type="opt", vocab_size=text_vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                       image_text_hidden_size=16)


def make_captioning_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random Blip2ForConditionalGeneration with a word-level OPT-style tokenizer."""
    from blip2 import Blip2ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(OPT_SPECIALS, "</s> $A", ["</s>"])
    special = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_processor_files(folder, tok, special, "PreTrainedTokenizerFast")
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(_tiny_config(tok.get_vocab_size(), 8, retrieval=False))
    _redraw(model, seed)
    model.language_model.tie_weights()
    model.save_pretrained(folder)
    return folder


def make_retrieval_checkpoint(folder: Path, seed: int = 1) -> Path:
    """A tiny random Blip2ForImageTextRetrieval with a word-level BERT-style tokenizer."""
    from blip2 import Blip2ForImageTextRetrieval

    folder.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(BERT_SPECIALS, "[CLS] $A [SEP]", ["[CLS]", "[SEP]"])
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]"}
    _write_processor_files(folder, tok, special, "PreTrainedTokenizerFast")
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(_tiny_config(10, tok.get_vocab_size(), retrieval=True))
    _redraw(model, seed)
    model.save_pretrained(folder)
    return folder


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0-2; a prompt ends with </s>, the decoder starts from <pad>


def make_t5_checkpoint(folder: Path, seed: int = 3) -> Path:
    """A tiny random BLIP-2 over a Flan-T5-style language model (gated GELU, untied head), built and
    saved by the reference (transformers), with a word-level T5-style tokenizer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = _word_tokenizer(T5_SPECIALS, "$A </s>", ["</s>"])
    _write_processor_files(folder, tok, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
                           "PreTrainedTokenizerFast")
    config = _tiny_config(tok.get_vocab_size(), 8, retrieval=False).to_dict()
    config["text_config"] = dict(model_type="t5", vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=48,
                                 num_layers=2, num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                 pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=0,
                                 tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config.from_dict(config))
    _redraw(model, seed)
    model.save_pretrained(folder)
    return folder


def make_t5_engine(root: Path, settings=None):
    """An Engine over a fresh tiny T5 checkpoint under `root` (no retrieval model)."""
    from blip2 import Blip2ForConditionalGeneration
    from blip2.server.engine import Engine

    folder = make_t5_checkpoint(root / "t5")
    return Engine(Blip2ForConditionalGeneration.from_pretrained(folder), load_processor(folder),
                  settings=settings, name="tiny-blip2-t5")


def load_processor(folder: Path):
    """Our Blip2Processor when the processing package provides one; the reference's otherwise."""
    try:
        from blip2.processing import Blip2Processor
    except ImportError:
        from transformers import Blip2Processor
    return Blip2Processor.from_pretrained(str(folder))


def make_engine(root: Path, settings=None, retrieval: bool = True):
    """An Engine over fresh tiny checkpoints under `root`."""
    from blip2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
    from blip2.server.engine import Engine

    cap = make_captioning_checkpoint(root / "captioning")
    parts = dict(model=Blip2ForConditionalGeneration.from_pretrained(cap), processor=load_processor(cap))
    if retrieval:
        ret = make_retrieval_checkpoint(root / "retrieval")
        parts.update(retriever=Blip2ForImageTextRetrieval.from_pretrained(ret), retrieval_processor=load_processor(ret))
    return Engine(settings=settings, name="tiny-blip2", **parts)


def server_settings(**overrides):
    """Settings for test servers: small limits the error tests can reach, a wait long enough to batch."""
    from blip2.server.limits import Settings

    base = dict(max_wait_ms=50, max_new_tokens=64, default_max_new_tokens=12, max_image_pixels=1_000_000,
                max_body_bytes=2 * 2**20, max_batch=8, request_timeout_s=30)
    return Settings(**{**base, **overrides})


# ---------------------------------------------------------------- images
def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small random-colour PNG; different seeds give different images (and sha256s)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------- a live server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread (a real socket, real HTTP)."""

    def __init__(self, app, settings=None) -> None:
        """With `settings`, uvicorn gets the socket limits `blip2 serve` gives it (header deadline...)."""
        import uvicorn

        from blip2.server.sockets import uvicorn_options

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        extra = uvicorn_options(settings) if settings is not None else {}
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10, **extra)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def sse_events(response) -> list:
    """The JSON payloads (or the literal [DONE]) of a server-sent-events response read with httpx."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
