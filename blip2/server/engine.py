"""The model side of the server: batched caption / answer / match / embed over one loaded model.

`Engine.run(key, jobs)` is the batch function the batcher calls in its model thread. Every
image's image-encoder states are cached by the sha256 of its bytes, so a second question about
the same image skips the image encoder (the largest part of the image side). The Q-Former runs
per request: an instruction-aware one (InstructBLIP) reads the prompt too, so what it gives the
language model depends on more than the image.
Errors that belong to one job (a prompt too long) come back in that job's slot; the rest
of the batch still runs.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..families import family_of
from ..generation import CallbackStreamer, GenerationConfig, generate, resolve_config
from ..modeling.blip2 import check_positions
from ..modeling.inference import fit_layouts
from .limits import ApiError, ImageData, Settings
from .stops import StopFilter, StopReached, first_stop, stop_length


# ---------------------------------------------------------------- jobs and results
@dataclass(frozen=True)
class GenerationSettings:
    """The per-request generation options; requests batch together only when these agree."""

    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (see stops.py): the text ends before the first one

    def shared(self) -> "GenerationSettings":
        """What a batch of these requests must agree on: everything but max_new_tokens and stop
        strings, unless beam search runs (a row's first n greedy or sampled tokens do not depend on
        how long the other rows run, or it runs; beam search ranks by the whole length)."""
        return self if self.num_beams > 1 else dataclasses.replace(self, max_new_tokens=0, stop=())

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = asdict(self)
        kwargs.pop("stop")  # the server's own: applied to the text (see stops.py)
        if not self.do_sample:
            for name in ("temperature", "top_p", "top_k", "seed"):
                kwargs.pop(name)
        if not kwargs["min_new_tokens"]:
            kwargs.pop("min_new_tokens")
        return kwargs


@dataclass
class GenerateJob:
    image: ImageData
    prompt: str
    settings: GenerationSettings
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (an end token or a stop string) or "length" (max_new_tokens reached)
    cached: bool  # the image's features came from the cache


@dataclass
class MatchJob:
    image: ImageData
    texts: list[str]
    mode: str  # "itm" (match probability) or "itc" (cosine similarity)


@dataclass
class EmbedJob:
    texts: list[str]
    image: ImageData | None = None


@dataclass
class RowInputs:
    """What the continuous scheduler needs to start one request: its prompt as embeddings and its options."""

    embeds: Tensor  # (1, Q + T, D): the image's queries, then the prompt's tokens
    config: GenerationConfig  # the model's defaults with the request's own options
    prompt_tokens: int
    cached: bool  # the image's features came from the cache


class Cancelled(Exception):
    """The client of a streaming request went away; generation stops at the next token."""


# ---------------------------------------------------------------- the feature cache
class FeatureCache:
    """An LRU of per-image tensors keyed by (kind, sha256); thread-safe (the event loop peeks, the model thread fills)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: collections.OrderedDict[tuple[str, str], Tensor] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, kind: str, sha: str) -> Tensor | None:
        """The entry, marked most recently used; hits and misses are counted by `record`."""
        with self.lock:
            value = self.entries.get((kind, sha))
            if value is not None:
                self.entries.move_to_end((kind, sha))
            return value

    def record(self, hit: bool) -> None:
        with self.lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, kind: str, sha: str, value: Tensor) -> None:
        if self.capacity <= 0:
            return
        with self.lock:
            self.entries[(kind, sha)] = value
            self.entries.move_to_end((kind, sha))
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"entries": len(self.entries), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


# ---------------------------------------------------------------- the engine
class Engine:
    """Owns the models and processors; every public method runs in the batcher's model thread."""

    def __init__(self, model=None, processor=None, retriever=None, retrieval_processor=None,
                 settings: Settings | None = None, name: str = "blip2") -> None:
        if model is None and retriever is None:
            raise ValueError("the engine needs a captioning model, a retrieval model, or both")
        self.model = model.eval() if model is not None else None
        self.processor = processor
        self.retriever = retriever.eval() if retriever is not None else None
        self.retrieval_processor = retrieval_processor
        self.settings = settings or Settings()
        self.name = name
        self.cache = FeatureCache(self.settings.cache_size)
        self.generation_defaults = self._generation_defaults()

    # ---- loading ----
    @classmethod
    def load(cls, model_path: str | Path, retrieval_path: str | Path | None = None, settings: Settings | None = None,
             device: str | None = None, dtype: str | None = None, name: str | None = None) -> "Engine":
        """Loads a checkpoint (and optionally a retrieval one) with its processor.

        A retrieval checkpoint given as `model_path` serves /v1/match and /v1/embeddings only.
        """
        parts: dict[str, Any] = {}
        for path in (model_path, retrieval_path):
            if path is None:
                continue
            model, processor = _load_one(path, device, dtype)
            role = "retriever" if _is_retrieval(model) else "model"
            if role in parts:
                raise ValueError(f"{path}: two {role} checkpoints given; pass one captioning and one retrieval model")
            parts[role] = model
            parts["retrieval_processor" if role == "retriever" else "processor"] = processor
        name = name or Path(str(model_path)).name or str(model_path)
        return cls(settings=settings, name=name, **parts)

    def _generation_defaults(self) -> GenerationConfig | None:
        """The model's generation config (text config + generation_config.json); requests override it."""
        if self.model is None:
            return None
        config = getattr(self.model, "generation_config", None)
        return config if isinstance(config, GenerationConfig) else resolve_config(self.model.config.text_config)

    # ---- what the server can do ----
    @property
    def can_generate(self) -> bool:
        return self.model is not None

    @property
    def can_match(self) -> bool:
        return self.retriever is not None

    @property
    def decoder_only(self) -> bool:
        return self.model is not None and family_of(self.model.config).decoder_only

    def question_template(self) -> str:
        """The paper's VQA prompt for this language model (its family's, see `blip2.families`)."""
        return family_of(self.model.config).question_template if self.model is not None else "Question: {} Answer:"

    def caption_prompt(self) -> str:
        """The prompt of a caption asked without one: none for BLIP-2; an InstructBLIP model's Q-Former
        needs an instruction, the one `blip2 caption` gives it."""
        if getattr(self.processor, "qformer_tokenizer", None) is None:
            return ""
        from ..commands import INSTRUCT_CAPTION_PROMPT

        return INSTRUCT_CAPTION_PROMPT

    def feature_kind(self, task: str) -> str:
        """The cache entry a task reads: language inputs for generation, image-encoder states for retrieval."""
        return "image" if task in ("generate", "stream") else "vision"

    def generate_key(self, settings: GenerationSettings) -> tuple:
        """The batcher's key of a generation request: requests with equal keys share a batch."""
        forced_end = self.generation_defaults is not None and self.generation_defaults.forced_eos_token_id is not None
        return ("generate", settings if forced_end else settings.shared())  # a forced end lands at max length

    def batch_limit(self, key: Hashable) -> int:
        """A seeded request may share a batch: every row draws from its own stream (see `generate`)."""
        if key[0] == "stream":
            return 1  # a streamer follows one sequence
        return self.settings.max_batch

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "captioning": self.can_generate, "retrieval": self.can_match,
                "language_model": self.model.config.text_config.model_type if self.model is not None else None}

    # ---- the batch function ----
    @torch.inference_mode()
    def run(self, key: Hashable, jobs: list) -> Sequence[Any]:
        task = key[0]
        for model in (self.model, self.retriever):
            if model is not None:
                fit_layouts(model)  # prepacked weights, as model.generate would use
        if task in ("generate", "stream"):
            return self.generate(jobs, key[1])
        if task == "match":
            return self.match(jobs, key[1])
        if task == "embed":
            return self.embed(jobs)
        raise ValueError(f"unknown task {task!r}")

    # ---- caption / answer ----
    def generate(self, jobs: list[GenerateJob], settings: GenerationSettings) -> list[Any]:
        """One generate call for the whole batch: prompts padded, image features from the cache.

        Rows may ask for different max_new_tokens (see `generate_key`): the batch runs to the
        longest and each row keeps its own first tokens, which are what it would generate alone."""
        results: list[Any] = [None] * len(jobs)
        prompts: list[list[int]] = []
        live: list[int] = []
        for i, job in enumerate(jobs):
            try:
                prompts.append(self._prompt_ids(job.prompt, job.settings))
                live.append(i)
            except ApiError as err:
                results[i] = err
        if not live:
            return results
        states, cached = self._features([jobs[i].image for i in live], "image", self._image_states)
        # Decoder-only: pad on the left so every row continues from its last token (OPT counts
        # positions over the mask). T5: on the right, so padding never sits between the queries
        # and the text and changes their relative positions.
        input_ids, mask = _pad(prompts, self._pad_id(), left=self.decoder_only)
        device = self.model.device
        longest = max(jobs[i].settings.max_new_tokens for i in live)
        config = self.generation_defaults.updated({**settings.generate_kwargs(), "max_new_tokens": longest})
        streamer = self._streamer(jobs[live[0]]) if jobs[live[0]].on_text is not None else None
        if streamer is not None and jobs[live[0]].settings.stop:
            streamer = _StopWatch(streamer, self, jobs[live[0]].settings.stop)
        instruction = self._instruction_inputs([jobs[i].prompt for i in live], device)
        lm_inputs = self.model.language_inputs_from_image(torch.stack(states).to(device), **instruction)
        stepper, start_ids = self.model.stepper_from_language_inputs(
            lm_inputs, input_ids.to(device), mask.to(device), config)
        try:
            new = generate(stepper, start_ids, config, streamer)[:, 1:]  # (rows, new tokens): the start id dropped
        except StopReached:  # a streamed request (a batch of one) reached a stop string
            new = torch.tensor([streamer.tokens])
        for row, i in enumerate(live):
            mine = new[row, : jobs[i].settings.max_new_tokens]
            results[i] = self._result(mine, config, len(prompts[row]), cached[row], jobs[i].settings.stop)
        return results

    # ---- continuous batching (see scheduler.py) ----
    def can_join(self, key: Hashable, job: Any) -> bool:
        """Whether a request may run in the continuous decode batch: greedy or sampled generation.
        Beam search and rotary scaling that follows the sequence length (a row's window would
        depend on its neighbours) go to the micro-batcher."""
        if key[0] not in ("generate", "stream") or not self.can_generate:
            return False
        scaling = getattr(self.model.config.text_config, "rope_scaling", None) or {}
        return job.settings.num_beams == 1 and scaling.get("type") != "dynamic"

    def row_inputs(self, jobs: list[GenerateJob]) -> list[RowInputs | Exception]:
        """Each job's prompt embeddings (image features from the cache, the image encoder and
        Q-Former batched over the jobs), or the error that is that job's alone."""
        out: list[Any] = [None] * len(jobs)
        prompts: dict[int, list[int]] = {}
        configs: dict[int, GenerationConfig] = {}
        for i, job in enumerate(jobs):
            try:
                prompts[i] = self._prompt_ids(job.prompt, job.settings)
                configs[i] = self.generation_defaults.updated(job.settings.generate_kwargs())
            except (ApiError, ValueError) as err:
                out[i] = err if isinstance(err, ApiError) else ApiError(400, str(err))
        live = list(prompts)
        if not live:
            return out
        device = self.model.device
        states, cached = self._features([jobs[i].image for i in live], "image", self._image_states)
        instruction = self._instruction_inputs([jobs[i].prompt for i in live], device)
        lm_inputs = self.model.language_inputs_from_image(torch.stack(states).to(device), **instruction)  # (k, Q, D)
        for row, i in enumerate(live):
            ids = torch.tensor([prompts[i]], dtype=torch.long, device=device)  # (1, T)
            embeds, _ = self.model.merge(lm_inputs[row : row + 1], ids, None)  # (1, Q + T, D), queries in front
            out[i] = RowInputs(embeds, configs[i], len(prompts[i]), cached[row])
        return out

    def _prompt_ids(self, prompt: str, settings: GenerationSettings) -> list[int]:
        text = self.model.config.text_config
        ids = _encode(self.processor, prompt, "prompt") if prompt else []
        if not ids:  # no prompt: the start token alone, as the reference's generate does
            ids = [text.bos_token_id if text.bos_token_id is not None else self._pad_id()]
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens long; the limit is {limit}", "prompt")
        image_token = self.model.config.image_token_index
        if image_token is not None and image_token in ids:
            # The server places the image itself; a typed "<image>" would break the merge for the whole batch.
            raise ApiError(400, "the prompt must not contain the image token; the server adds the image", "prompt")
        if max(ids) >= text.vocab_size:
            raise ApiError(400, f"the prompt has token id {max(ids)}, outside the model's vocabulary", "prompt")
        if family_of(self.model.config).learned_positions:
            # Checked per request, so one long request fails alone rather than its whole batch.
            try:
                check_positions(self.model.config.num_query_tokens + len(ids), settings.max_new_tokens,
                                text.max_position_embeddings)
            except ValueError as err:
                raise ApiError(400, str(err), "max_new_tokens") from None
        return ids

    def _image_states(self, pixel_values: Tensor) -> Tensor:
        return self.model.image_features(pixel_values).last_hidden_state  # (B, N, Dv)

    def _instruction_inputs(self, prompts: list[str], device) -> dict[str, Tensor]:
        """What an instruction-aware Q-Former reads besides the image: the prompts, through the
        processor's `qformer_tokenizer` (the reference's InstructBLIP processor has one); none for BLIP-2."""
        tokenizer = getattr(self.processor, "qformer_tokenizer", None)
        if tokenizer is None:
            return {}
        rows = [_encode(tokenizer, prompt, "prompt") for prompt in prompts]
        ids, mask = _pad(rows, getattr(tokenizer, "pad_token_id", None) or 0, left=False)
        return {"qformer_input_ids": ids.to(device), "qformer_attention_mask": mask.to(device)}

    def _streamer(self, job: GenerateJob) -> CallbackStreamer:
        started = False

        def on_text(piece: str, final: bool) -> None:
            nonlocal started
            if job.cancelled.is_set():
                raise Cancelled("the client went away")
            if not started:
                piece = piece.lstrip()  # the answer is reported stripped; so is its first piece
                started = bool(piece)
            if piece:
                job.on_text(piece)

        # a stop string and what follows never reach the client
        shown = StopFilter(job.settings.stop, on_text) if job.settings.stop else on_text
        return CallbackStreamer(self.processor, shown, skip_special_tokens=True)

    def decode(self, tokens: list[int]) -> str:
        return _decode(self.processor, tokens)

    def _result(self, new_tokens: Tensor, config: GenerationConfig, prompt_tokens: int, cached: bool,
                stops: tuple[str, ...] = ()) -> GenerateResult:
        """The answer to one request from its new tokens: up to its first end token or stop string."""
        tokens = new_tokens.tolist()
        eos = set(config.eos_ids)
        ended = next((n + 1 for n, t in enumerate(tokens) if t in eos), None)
        if ended is not None:
            tokens = tokens[:ended]
        stopped = stop_length(self.decode, tokens, stops)
        if stopped is not None:
            tokens, ended = tokens[:stopped], stopped
        text = self.decode(tokens)
        if stopped is not None:
            text = text[: first_stop(text, stops)]
        return GenerateResult(text.strip(), prompt_tokens, len(tokens), "stop" if ended is not None else "length", cached)

    def _pad_id(self) -> int:
        text = self.model.config.text_config
        for value in (text.pad_token_id, text.eos_token_id, 0):
            if isinstance(value, int):
                return value
        return 0

    # ---- match ----
    def match(self, jobs: list[MatchJob], mode: str) -> list[list[dict[str, float]]]:
        """Each job's image against each of its texts: the ITM match probability and/or the ITC
        cosine similarity (the best over the queries), as `blip2 match` reports them."""
        r = self.retriever
        states, _ = self._features([job.image for job in jobs], "vision", self._vision_states)
        texts = [text for job in jobs for text in job.texts]
        owner = torch.tensor([n for n, job in enumerate(jobs) for _ in job.texts], device=r.device)  # image of each text
        ids, mask = self._text_batch(texts)
        image = torch.stack(states).to(r.device)  # (B, S, Dv)
        columns: dict[str, list[float]] = {}
        if mode in ("itm", "both"):
            joint_mask = torch.cat([mask.new_ones(len(texts), r.config.num_query_tokens), mask], dim=1)
            logits = r.itm_logits(r.itm_states(image[owner], ids, joint_mask).last_hidden_state)  # (N, 2)
            columns["itm_probability"] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().tolist()
        if mode in ("itc", "both"):
            queries = r.image_embeds(r.image_queries(image).last_hidden_state)  # (B, Q, E)
            text_emb = r.text_embeds(r.text_states(ids, mask).last_hidden_state)  # (N, E)
            sims = torch.einsum("nqe,ne->nq", queries[owner], text_emb).max(dim=1).values
            columns["itc_score"] = sims.float().cpu().tolist()
        rows = [{name: values[n] for name, values in columns.items()} for n in range(len(texts))]
        out, start = [], 0
        for job in jobs:
            out.append(rows[start : start + len(job.texts)])
            start += len(job.texts)
        return out

    # ---- embed ----
    def embed(self, jobs: list[EmbedJob]) -> list[list[dict[str, Any]]]:
        """ITC embeddings per job, texts first: a text's projected [CLS]; an image's projected
        queries and their normalised mean (one vector, for stores that keep one per item)."""
        r = self.retriever
        texts = [text for job in jobs for text in job.texts]
        text_emb = []
        if texts:
            ids, mask = self._text_batch(texts)
            text_emb = r.text_embeds(r.text_states(ids, mask).last_hidden_state).float().cpu().tolist()  # (N, E)
        with_image = [job for job in jobs if job.image is not None]
        image_emb = {}
        if with_image:
            states, _ = self._features([job.image for job in with_image], "vision", self._vision_states)
            queries = r.image_embeds(r.image_queries(torch.stack(states).to(r.device)).last_hidden_state)  # (B, Q, E)
            pooled = torch.nn.functional.normalize(queries.mean(dim=1), dim=-1)
            for row, job in enumerate(with_image):
                image_emb[id(job)] = {"kind": "image", "embedding": pooled[row].float().cpu().tolist(),
                                      "query_embeddings": queries[row].float().cpu().tolist()}
        results, start = [], 0
        for job in jobs:
            items = [{"kind": "text", "embedding": e} for e in text_emb[start : start + len(job.texts)]]
            start += len(job.texts)
            if job.image is not None:
                items.append(image_emb[id(job)])
            results.append(items)
        return results

    def _vision_states(self, pixel_values: Tensor) -> Tensor:
        return self.retriever.vision_model(pixel_values).last_hidden_state  # (B, S, Dv)

    def _text_batch(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        limit = self.retriever.config.qformer_config.max_position_embeddings
        rows = [_encode(self.retrieval_processor, text, "texts")[:limit] for text in texts]
        pad = self.retriever.config.qformer_config.pad_token_id or 0
        ids, mask = _pad(rows, pad, left=False)  # BERT-style: the [CLS] stays at position 0
        return ids.to(self.retriever.device), mask.to(self.retriever.device)

    # ---- image features, through the cache ----
    def _features(self, images: list[ImageData], kind: str, compute: Callable[[Tensor], Tensor]):
        """Per-image feature tensors (cached by sha256) and whether each came from the cache."""
        found: dict[str, Tensor] = {}
        cached = []
        for img in images:
            if img.sha256 not in found:
                # The handler may have taken the features already (then it did not decode the image).
                hit = img.features if img.features is not None else self.cache.get(kind, img.sha256)
                if hit is not None:
                    found[img.sha256] = hit
            cached.append(img.sha256 in found)
            self.cache.record(cached[-1])
        missing: dict[str, Any] = {}
        for img in images:
            if img.sha256 not in found and img.sha256 not in missing:
                missing[img.sha256] = img.image
        if missing:
            model = self.model if kind == "image" else self.retriever
            processor = self.processor if kind == "image" else self.retrieval_processor
            pixels = _pixels(processor, list(missing.values())).to(model.device, model.dtype)
            values = compute(pixels)
            for sha, value in zip(missing, values):
                value = value.clone()  # a row of a batch tensor would keep the whole batch alive
                found[sha] = value
                self.cache.put(kind, sha, value)
        return [found[img.sha256] for img in images], cached


class _StopWatch:
    """The streamer of a streamed batch of one with stop strings: `generate` has no stop hook, so
    reaching a stop string raises StopReached out of it, after the stream's last piece."""

    def __init__(self, streamer: CallbackStreamer, engine: Engine, stops: tuple[str, ...]) -> None:
        self.streamer, self.engine, self.stops = streamer, engine, stops
        self.tokens: list[int] = []  # the new tokens so far
        self.started = False

    def put(self, value: Tensor) -> None:
        self.streamer.put(value)
        if not self.started:  # the start ids come first (the streamer protocol)
            self.started = True
            return
        self.tokens += value.reshape(-1).tolist()
        if first_stop(self.engine.decode(self.tokens), self.stops) is not None:
            self.streamer.end()
            raise StopReached

    def end(self) -> None:
        self.streamer.end()


# ---------------------------------------------------------------- processor calls (the documented API)
def _encode(processor, text: str, param: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens (OPT's BOS, BERT's [CLS] ... [SEP]);
    text the tokenizer refuses is the request's fault: a 400 naming the field `param`."""
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        ids = tokenizer(text)["input_ids"]
    except Exception as err:  # noqa: BLE001 - whatever the tokenizer refuses, it is this text's fault
        raise ApiError(400, f"'{param}' cannot be tokenized: {type(err).__name__}: {err}", param) from None
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _decode(processor, ids: list[int]) -> str:
    return processor.decode(ids, skip_special_tokens=True)


def _pixels(processor, images: list) -> Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[n, span] = torch.tensor(row, dtype=torch.long)
        mask[n, span] = 1
    return ids, mask


# ---------------------------------------------------------------- loading
def _is_retrieval(model) -> bool:
    return hasattr(model, "itm_head")


def _load_one(path, device: str | None, dtype: str | None):
    """A checkpoint directory (or hub id) -> (model, processor), choosing the class from its config."""
    from .. import Blip2ForImageTextRetrieval, load_model, load_processor
    from ..processing import Blip2Processor

    # No --dtype: serve in the checkpoint's own dtype (from_pretrained alone would give float32).
    if _is_retrieval_checkpoint(path):
        model = Blip2ForImageTextRetrieval.from_pretrained(path, torch_dtype=dtype or "auto", device=device)
        return model, Blip2Processor.from_pretrained(path)
    # BLIP-2 or InstructBLIP, as config.json says
    return load_model(path, torch_dtype=dtype or "auto", device=device), load_processor(path)


def _is_retrieval_checkpoint(path) -> bool:
    """Retrieval (ITM/ITC, no language model) or captioning, from config.json.

    A retrieval Q-Former reads text (`use_qformer_text_input`); the architectures list alone is
    not trusted, since a config saved from one class and reused for another keeps the old name.
    """
    from ..hub import read_json, resolve_file

    config = read_json(resolve_file(path, "config.json"))
    if not (config.get("qformer_config") or {}).get("use_qformer_text_input"):
        return False
    names = config.get("architectures") or []
    return not any("ForConditionalGeneration" in n for n in names)
