"""Continuous batching: requests join the running decode batch at step boundaries and leave when they finish.

The micro-batcher (batcher.py) runs a batch to its end, so a request arriving one step late
waits for the whole batch. First a thread of its own *prepares* each arrival's prompt embeddings
(image features from the content-hash cache or the image encoder, then the Q-Former), in batches
while the model thread decodes. Then the model thread runs one *tick* at a time:

1. admit: prepared requests take free rows of a preallocated KV cache, prefilled together into
   their rows (left-padded), and choose their first token; they join a running batch a few at a
   time (an admission has a fixed cost: a forward of its own), or alone once the oldest has
   waited --max-wait-ms.
   T5 (`EncoderDecoderSlots`): the encoder reads the prompts and each row keeps its own
   cross-attention keys, values and encoder mask; its first step feeds the decoder start token;
2. step: every live row feeds its last token at its own position (`Positions` with per-row
   slots and masks; T5: its own relative-position bias) and chooses the next;
3. leave: rows that ended (an end token, their own max_new_tokens, an error, a client that went
   away) are answered at once and free their row for the next tick's arrivals.

Each row keeps its own options: greedy or sampling from its own seeded generator, penalties,
min/max tokens, stop strings, its own streamer. So what a request gets does not depend on its
neighbours: its greedy tokens are those `generate` gives it alone. Rows stay packed at the front of the
cache (a leaving row's place goes to the last row), so a step's forward runs over exactly the
live rows: keys and values (live, H, S, D), S the longest live row.

Admission is bounded twice: the waiting queue (a full queue is a 503 with Retry-After, as in the
micro-batcher) and the KV cache (`max_batch` rows, fewer when `kv_cache_mb` says so): a request
waits until a row is free. Beam search, match and embed go to the micro-batcher, which shares
the one model thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch
from torch import Tensor

from ..generation import CallbackStreamer, GenerationConfig
from ..generation.processors import is_active, process, warp
from ..modeling.attention import KVCache, Positions
from ..modeling.inference import fit_layouts
from .batcher import Batcher, BatchStats, wait_result
from .engine import Engine, GenerateJob, GenerateResult, RowInputs
from .limits import ApiError, Settings
from .stops import first_stop

if TYPE_CHECKING:
    from ..modeling.t5 import T5Cache

log = logging.getLogger("blip2.server")

# Decode steps one trip to the model thread may run while nobody could join and no row has ended:
# each trip through the event loop costs about what a small model's step costs.
STEPS_PER_TRIP = 8


# ---------------------------------------------------------------- one request in the batch
@dataclass(eq=False)
class Row:
    """One generation request, from the queue to its answer."""

    job: GenerateJob
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # its waiter is gone (timeout, client left): set on the event loop
    # filled in by the model thread on admission
    config: GenerationConfig | None = None
    limit: int = 0  # max new tokens
    start_id: int = 0  # the history generation starts from (BOS), as `generate` counts it
    prompt_tokens: int = 0
    cached: bool = False
    filled: int = 0  # cache slots this request uses (padding included); its next token goes to slot `filled`
    position: int = 0  # its real tokens so far: the position of its next token
    encoded: int = 0  # encoder positions its cross-attention reads (T5; 0 for a decoder-only model)
    tokens: list[int] = field(default_factory=list)  # new tokens; the last is fed at the next step
    inputs: RowInputs | None = None  # its prompt embeddings and options, prepared before it joins
    plain: bool = True  # greedy with no score processing: the batch's argmax is its token
    eos: frozenset[int] = frozenset()
    stops: tuple[str, ...] = ()
    generator: torch.Generator | None = None
    streamer: CallbackStreamer | None = None
    outcome: GenerateResult | BaseException | None = None  # set when the row leaves

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    @property
    def feed(self) -> int:
        """The token the next step feeds: its last new token, or its start token before it has any (T5)."""
        return self.tokens[-1] if self.tokens else self.start_id


def _pick(row: Row, logits: Tensor) -> int:
    """The row's next token from its logits (1, V): penalties, then greedy or a draw from its generator."""
    config = row.config
    scores = logits
    if is_active(config):
        history = torch.tensor([[row.start_id, *row.tokens]], device=logits.device)  # (1, L) as generate's
        scores = process(scores, history, config, 1)
    if not config.do_sample:
        return int(scores.argmax(dim=-1))
    probs = torch.softmax(warp(scores, config), dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=row.generator))


def _accept(row: Row, token: int, engine: Engine) -> None:
    """Appends the token, streams it, and ends the row at an end token, a stop string or its token limit."""
    row.tokens.append(token)
    if row.streamer is not None:
        row.streamer.put(torch.tensor([token]))
    if (token in row.eos or len(row.tokens) >= row.limit
            or (row.stops and first_stop(engine.decode(row.tokens), row.stops) is not None)):
        if row.streamer is not None:
            row.streamer.end()
        row.outcome = engine._result(torch.tensor(row.tokens), row.config, row.prompt_tokens, row.cached, row.stops)


# ---------------------------------------------------------------- the model side
class SlotDecoder:
    """A KV cache of `slots` rows and the tick over it (model thread only), for a decoder-only
    language model (OPT, Llama); `EncoderDecoderSlots` is T5's.

    A row holds the longest request the server's limits allow: query tokens + max_prompt_tokens
    (prompts prefilled together are left-padded to the longest) + max_new_tokens."""

    def __init__(self, engine: Engine, slots: int, limits: Settings | None = None) -> None:
        self.engine = engine
        self.lm = engine.model.language_model
        limits = limits or engine.settings
        self.slots, self.max_new = slots, limits.max_new_tokens
        self.row_len = engine.model.config.num_query_tokens + limits.max_prompt_tokens + limits.max_new_tokens
        self.cache = None  # allocated on the first tick, in the model thread (see `_new_cache`)
        # (slots, row_len) additive: 0 on the cache slots holding each row's tokens, the dtype's
        # minimum elsewhere; kept up to date in place, so a step's mask is a view, not a new tensor
        self.mask: Tensor | None = None
        self.rows: list[Row] = []  # live rows, in cache-row order

    def tick(self, joining: list[Row]) -> list[Row]:
        """Admits `joining` (at most the free rows), advances every live row one token; returns the rows that ended."""
        if len(joining) > self.slots - len(self.rows):
            raise ValueError(f"{len(joining)} requests joining but only {self.slots - len(self.rows)} rows are free")
        ended: list[Row] = []
        with torch.inference_mode():
            if joining:
                self._admit(joining, ended)
            if self.rows:
                self._step(ended)
            self._drop(ended)
        return ended

    # ---- admit ----
    def _admit(self, joining: list[Row], ended: list[Row]) -> None:
        if self.cache is None:  # the first request; a server's model keeps its layout after that
            fit_layouts(self.engine.model)  # prepacked weights, as model.generate would use
            self.cache = self._new_cache(self.slots)
            k = self.self_kv.k[0]
            self.mask = torch.full((self.slots, self.row_len), torch.finfo(k.dtype).min, dtype=k.dtype, device=k.device)
        unprepared = [r for r in joining if r.inputs is None]  # the scheduler prepares them beforehand
        if unprepared:
            for row, inputs in zip(unprepared, self.engine.row_inputs([r.job for r in unprepared])):
                row.inputs = inputs
        ready = []
        for row in joining:
            inputs, row.inputs = row.inputs, None  # the cache holds what is needed of them after the prefill
            try:
                if isinstance(inputs, Exception):
                    raise inputs  # this request's own fault (a prompt too long...): it fails alone
                self._start(row, inputs)
                ready.append((row, inputs.embeds))
            except Exception as err:  # noqa: BLE001
                row.outcome = err
                ended.append(row)
        if ready:
            self._prefill([r for r, _ in ready], [e for _, e in ready])
            self._drop(ended)  # rows that ended on their first token free their row at once

    def _start(self, row: Row, inputs) -> None:
        """Per-row generation state, as `generate` would set it up for this request alone."""
        config = row.config = inputs.config
        row.start_id, row.limit = self._start_token(config), config.new_token_limit(1)
        row.prompt_tokens, row.cached = inputs.prompt_tokens, inputs.cached
        row.plain = not config.do_sample and not is_active(config)  # decided here, not at every step
        row.eos, row.stops = frozenset(config.eos_ids), row.job.settings.stop
        if config.do_sample and config.seed is not None:  # its own stream, in any batch
            row.generator = torch.Generator(device=inputs.embeds.device).manual_seed(config.seed)
        if row.limit > self.max_new:  # the HTTP layer checks this too; the cache rows are sized by it
            raise ApiError(400, f"max_new_tokens is {row.limit}; the limit is {self.max_new}", "max_new_tokens")
        if row.job.on_text is not None:
            row.streamer = self.engine._streamer(row.job)
            row.streamer.put(torch.tensor([[row.start_id]]))  # the reference's protocol: start ids first

    # ---- what depends on the language model (`EncoderDecoderSlots` replaces these for T5) ----
    def _new_cache(self, slots: int, device=None) -> KVCache:
        return self.lm.new_cache(slots, self.row_len, device=device)  # k, v: [layers] of (slots, H, row_len, D)

    @property
    def self_kv(self) -> KVCache:
        """The cache of the self-attention keys and values (the slots `Positions` index)."""
        return self.cache

    @staticmethod
    def _start_token(config: GenerationConfig) -> int:
        return config.bos_token_id  # the prompt begins with it: it is history, never fed

    def _logits(self, tokens: Tensor, at: Positions) -> Tensor:
        """One step over the live rows: tokens (n, 1) at `at` -> next-token logits (n, V)."""
        n = len(self.rows)
        return self.lm(self.lm.embed(tokens), cache=self.cache.rows(0, n), positions=at, last_logits=1).logits[:, -1]

    def _prefill(self, rows: list[Row], embeds: list[Tensor]) -> None:
        """Runs the prompts together into the next free cache rows, left-padded to the longest
        (positions count only real tokens, as in `generate`'s padded batches), and chooses each
        row's first token."""
        n, k, T = len(self.rows), len(rows), max(e.shape[1] for e in embeds)
        x = embeds[0].new_zeros(k, T, embeds[0].shape[-1])  # (k, T, D)
        keep = torch.zeros(k, T, dtype=torch.long, device=x.device)  # (k, T): 1 on real tokens
        for j, e in enumerate(embeds):
            x[j, T - e.shape[1]:] = e[0]
            keep[j, T - e.shape[1]:] = 1
        at = Positions.after(keep, T, x.dtype)  # slots 0..T-1 of each row, causal, padding hidden
        logits = self.lm(x, cache=self.cache.rows(n, n + k), positions=at, last_logits=1).logits[:, -1]  # (k, V)
        self.mask[n : n + k] = torch.finfo(self.mask.dtype).min  # what a previous request left there is not this row's
        self.mask[n : n + k, :T].masked_fill_(keep.bool(), 0.0)  # its tokens are seen, its padding is not
        for j, row in enumerate(rows):
            row.filled, row.position = T, embeds[j].shape[1]
            self.rows.append(row)
        self._choose(rows, logits)

    # ---- step ----
    def _step(self, ended: list[Row]) -> None:
        """One token for every live row, each at its own slot and position."""
        self._drop(ended)  # rows that were abandoned leave before the step
        if not self.rows:
            return
        rows, kv = self.rows, self.self_kv
        n, device = len(rows), kv.k[0].device
        # One tensor for the step's three columns: each torch call gives up the GIL, which the
        # server's other threads (HTTP, preparing arrivals) then hold for a while.
        state = torch.tensor([[r.filled, r.position, r.feed] for r in rows], device=device)  # (n, 3)
        slots = state[:, 0:1]  # (n, 1): where each new token goes
        ids = state[:, 1:2]  # (n, 1): its position (real tokens before it)
        tokens = state[:, 2:3]  # (n, 1)
        self.mask[:n].scatter_(1, slots, 0.0)  # the new token sees itself
        width = max(r.filled for r in rows) + 1
        at = Positions(ids=ids, slots=slots, mask=self.mask[:n, None, None, :width])  # (n, 1, 1, width)
        logits = self._logits(tokens, at)  # (n, V)
        for row in rows:
            row.filled += 1
            row.position += 1
        self._choose(rows, logits)

    def _choose(self, rows: list[Row], logits: Tensor) -> None:
        """Each row's next token from its logits (len(rows), V); an error ends only its row."""
        best = logits.argmax(dim=-1).tolist()  # plain greedy rows need nothing more
        for i, row in enumerate(rows):
            try:
                _accept(row, best[i] if row.plain else _pick(row, logits[i : i + 1]), self.engine)
            except Exception as err:  # noqa: BLE001 - a streamer whose client left, a bad draw: this row only
                row.outcome = err

    # ---- leave ----
    def _drop(self, ended: list[Row]) -> None:
        """Removes rows that ended or were abandoned; the last row moves into each freed place."""
        for i in reversed(range(len(self.rows))):
            row = self.rows[i]
            if row.abandoned and not row.ended:
                row.outcome = ApiError(499, "the client went away")
            if not row.ended:
                continue
            if row not in ended:
                ended.append(row)
            last = self.rows.pop()
            if last is not row:
                self.cache.copy_row(len(self.rows), i, last.filled)
                self.mask[i] = self.mask[len(self.rows)]
                self.rows[i] = last

    def fail_all(self, err: BaseException) -> list[Row]:
        """After an error outside any one row: every live row fails, the cache is rebuilt."""
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        for row in rows:
            row.outcome = err
        return rows

    def cache_bytes(self) -> int:
        """What the KV cache takes (or will, once allocated): rows x bytes per row."""
        return self.slots * self._new_cache(1, device="meta").nbytes()


class EncoderDecoderSlots(SlotDecoder):
    """`SlotDecoder` over T5: the encoder reads the prompt, the decoder writes the answer.

    Admission runs the encoder over the joining prompts (right-padded, as T5's relative positions
    need) and puts each row's cross-attention keys and values and encoder mask in its cache row;
    the decoder then starts with nothing cached, and the tick's step feeds each new row its decoder
    start token beside the running rows (so an admission adds no decoder forward of its own). A
    decoder has no padding, so a row's position is its slot, and each row gets the relative-position
    bias of its own step. A row holds query tokens + max_prompt_tokens encoder positions and
    max_new_tokens decoder positions (the start token, then every new token but the last)."""

    def __init__(self, engine: Engine, slots: int, limits: Settings | None = None) -> None:
        super().__init__(engine, slots, limits)
        limits = limits or engine.settings
        self.source_len = engine.model.config.num_query_tokens + limits.max_prompt_tokens
        self.row_len = limits.max_new_tokens

    def _new_cache(self, slots: int, device=None) -> T5Cache:
        return self.lm.new_slot_cache(slots, self.row_len, self.source_len, device)

    @property
    def self_kv(self) -> KVCache:
        return self.cache.self_kv

    @staticmethod
    def _start_token(config: GenerationConfig) -> int:
        return config.decoder_start_token_id  # fed at the row's first step

    def _prefill(self, rows: list[Row], embeds: list[Tensor]) -> None:
        n, k, S = len(self.rows), len(rows), max(e.shape[1] for e in embeds)
        x = embeds[0].new_zeros(k, S, embeds[0].shape[-1])  # (k, S, D)
        keep = torch.zeros(k, S, dtype=torch.long, device=x.device)  # (k, S): 1 on real tokens
        for j, e in enumerate(embeds):
            x[j, : e.shape[1]] = e[0]
            keep[j, : e.shape[1]] = 1
        encoded = self.lm.encode(x, keep).last_hidden_state  # (k, S, D)
        self.cache.put_rows(n, *self.lm.decoder.cross_state(encoded, keep))
        self.mask[n : n + k] = torch.finfo(self.mask.dtype).min  # no decoder token yet
        for j, row in enumerate(rows):
            row.filled = row.position = 0
            row.encoded = embeds[j].shape[1]
            self.rows.append(row)

    def _logits(self, tokens: Tensor, at: Positions) -> Tensor:
        n, width = len(self.rows), max(r.encoded for r in self.rows)
        return self.lm.decode(tokens, cache=self.cache.rows(0, n, width), positions=at).logits[:, -1]


def slot_decoder(engine: Engine, slots: int, settings: Settings | None = None) -> SlotDecoder:
    """The slot decoder for the engine's language model: decoder-only or encoder-decoder (T5)."""
    return (SlotDecoder if engine.decoder_only else EncoderDecoderSlots)(engine, slots, settings)


def kv_rows(engine: Engine, settings: Settings) -> int:
    """How many rows the KV cache has: `max_batch`, fewer when `kv_cache_mb` holds fewer."""
    rows = settings.max_batch
    if settings.kv_cache_mb is not None:
        one = slot_decoder(engine, 1, settings)
        rows = min(rows, int(settings.kv_cache_mb * 2**20 // one.cache_bytes()))
        if rows < 1:
            raise ValueError(f"kv_cache_mb={settings.kv_cache_mb:g} holds no request: one row of "
                             f"{one.row_len} positions takes {one.cache_bytes() / 2**20:.2f} MB")
    return rows


# ---------------------------------------------------------------- the event-loop side
class ContinuousScheduler:
    """The batcher's interface (`submit`, `check_room`, `start`, `stop`, `snapshot`) over a `SlotDecoder`.

    `run` is the micro-batcher's batch function, for the requests that cannot join (see
    `Engine.can_join`); `on_results` sees every finished generation (telemetry)."""

    def __init__(self, engine: Engine, run: Callable, settings: Settings,
                 on_results: Callable[[list], None] | None = None) -> None:
        self.engine = engine
        self.micro = Batcher(run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                             settings.request_timeout_s, engine.batch_limit)
        self.executor = self.micro.executor  # one model thread for both: the model is not re-entrant
        # None: no captioning model (retrieval only), so every request goes to the micro-batcher
        self.decoder = slot_decoder(engine, kv_rows(engine, settings), settings) if engine.can_generate else None
        # An admission (a prefill forward) has a fixed cost, so arrivals join a
        # running batch together: `admit_batch` of them, or fewer once the oldest has waited
        # max_wait_ms; a queue longer than that waits until as many rows are free.
        self.admit_batch = max(1, settings.max_batch // 4)
        self.max_wait_s = settings.max_wait_ms / 1000
        self.steps_per_trip = STEPS_PER_TRIP
        self.max_queue, self.timeout_s = settings.max_queue, settings.request_timeout_s
        self.on_results = on_results or (lambda results: None)
        # A request's prompt embeddings (image encoder, Q-Former: most of an admission's cost) do not
        # depend on the decode batch, so a thread of their own prepares them while the model thread
        # decodes: `arriving` -> (prepare thread) -> `pending` -> (model thread) a row of the cache.
        # Preparing is cheaper per request in larger batches (the image encoder and Q-Former have a
        # fixed cost per call), so arrivals are prepared when fewer than a cache's rows are ready,
        # as many together as are waiting (up to max_batch): under load, whole batches; idle, at once.
        self.arriving: collections.deque[Row] = collections.deque()
        self.preparing = 0  # requests in the prepare thread now
        self.prepare_batch = settings.max_batch  # the most prepared together
        self.prepare_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-prepare")
        self.pending: collections.deque[Row] = collections.deque()  # prepared, waiting for a row
        self.stats = BatchStats()  # one "batch" per step: its size is the live rows
        self.request_seconds: collections.deque[float] = collections.deque(maxlen=64)
        self._arrival: asyncio.Event | None = None  # a request was prepared (or the scheduler is closing)
        self._incoming: asyncio.Event | None = None  # a request arrived (or the scheduler is closing)
        self._worker: asyncio.Task | None = None
        self._preparer: asyncio.Task | None = None
        self._closing = False

    # ---- lifecycle ----
    async def start(self) -> None:
        await self.micro.start()
        self._arrival, self._incoming = asyncio.Event(), asyncio.Event()
        if self.decoder is not None:
            # Packed weights before the prepare thread first uses the model: packing swaps layers
            # that the other thread might be running.
            await asyncio.get_running_loop().run_in_executor(self.executor, self._fit_layouts)
            self._preparer = asyncio.create_task(self._prepare_loop(), name="blip2-prepare")
            self._worker = asyncio.create_task(self._loop(), name="blip2-scheduler")

    async def stop(self) -> None:
        """Finishes every queued and running request, then stops (graceful drain)."""
        self._closing = True
        for event in (self._arrival, self._incoming):
            if event is not None:
                event.set()
        if self._preparer is not None:
            await self._preparer
        if self._worker is not None:
            await self._worker
        self.prepare_executor.shutdown(wait=True)
        await self.micro.stop()

    def _fit_layouts(self) -> None:
        with torch.inference_mode():
            fit_layouts(self.engine.model)

    # ---- submitting ----
    def check_room(self) -> None:
        if self.decoder is None:
            return self.micro.check_room()
        if self._closing or self._worker is None:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.queued() >= self.max_queue:
            self.stats.rejected += 1
            raise ApiError(503, f"the server is busy: {self.queued()} requests are queued; retry later",
                           headers={"Retry-After": str(self.retry_after())})

    def queued(self) -> int:
        """Requests waiting for a row: being prepared or prepared."""
        return len(self.arriving) + self.preparing + len(self.pending)

    async def submit(self, key: Hashable, payload: Any, timeout_s: float | None = None) -> Any:
        if self.decoder is None or not self.engine.can_join(key, payload):
            return await self.micro.submit(key, payload, timeout_s)
        self.check_room()
        self.stats.requests_by_task[str(key[0])] += 1
        row = Row(payload, asyncio.get_running_loop().create_future())
        row.future.add_done_callback(lambda _: setattr(row, "abandoned", True))  # the tick drops it
        if self.decoder.rows or self.pending or self.arriving or self.preparing:
            self.arriving.append(row)
            self._incoming.set()
        else:  # an idle model: the model thread prepares it itself, one thread hop sooner
            self.pending.append(row)
            self._arrival.set()
        return await wait_result(row.future, self.timeout_s if timeout_s is None else timeout_s, self.stats)

    def retry_after(self) -> int:
        """Seconds until a queued request likely gets a row: queued rounds of rows times a request's time."""
        mean = sum(self.request_seconds) / len(self.request_seconds) if self.request_seconds else 1.0
        return max(1, math.ceil(self.queued() / self.decoder.slots * mean))

    # ---- preparing ----
    async def _prepare_loop(self) -> None:
        """Prepares arrivals in the prepare thread while fewer than a cache's rows are prepared, as
        many together as are waiting (up to `prepare_batch`), and queues them for a row; a request
        whose inputs fail is answered at once."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.arriving or len(self.pending) >= self.decoder.slots:
                if self._closing and not self.arriving:
                    self._arrival.set()  # the model loop may be waiting for this loop to end
                    return
                self._incoming.clear()  # set again by an arrival or by rows taken from `pending`
                await self._incoming.wait()
                continue
            batch = []
            while self.arriving and len(batch) < self.prepare_batch:
                row = self.arriving.popleft()
                if not row.abandoned:
                    batch.append(row)
            self.preparing = len(batch)
            try:
                prepared = await loop.run_in_executor(self.prepare_executor, self._prepare, [r.job for r in batch])
            except Exception as err:  # noqa: BLE001 - a bug here must not leave the requests hanging
                log.exception("preparing requests failed")
                prepared = [ApiError(500, f"generation failed: {type(err).__name__}: {err}")] * len(batch)
            finally:
                self.preparing = 0
            failed = []
            for row, inputs in zip(batch, prepared):
                if isinstance(inputs, Exception):
                    row.outcome = inputs
                    failed.append(row)
                else:
                    row.inputs = inputs
                    self.pending.append(row)
            self._answer(failed)
            self._arrival.set()

    def _prepare(self, jobs: list[GenerateJob]) -> list:
        """Prepare thread: each job's `RowInputs` or its error (see `Engine.row_inputs`)."""
        with torch.inference_mode():  # per thread; and the packed layers stay packed only without autograd
            return self.engine.row_inputs(jobs)

    # ---- the worker ----
    async def _loop(self) -> None:
        """Trips to the model thread (`_tick`) while there is work; answers go out between trips.

        A trip ends as soon as a row ends or a request could join, so neither waits more than a
        step. The model thread does not go on ticking while the loop works: when it did (an
        earlier version), the loop's request parsing and the model's many small ops fought over
        the GIL (bench_server_load, whole answers at 16 clients: 0.65x the micro-batcher's
        tokens/s, against 1.66x taking turns; one run each, at load 6.8 and 3.8)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending and not self.decoder.rows:
                if self._closing and not self.arriving and not self.preparing and self._preparer.done():
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            self._answer(await loop.run_in_executor(self.executor, self._tick))
            if self.arriving and len(self.pending) < self.decoder.slots:
                self._incoming.set()  # rows were taken: prepare the next arrivals

    def _tick(self) -> list[Row]:
        """Model thread: admits what may join now and advances the live rows, for up to
        `steps_per_trip` steps while no request could join and no row has ended (so neither waits
        more than one step); returns the rows that ended."""
        joining = self._take_joining()
        if not joining and not self.decoder.rows:
            return []
        started = time.monotonic()
        try:
            ended = self.decoder.tick(joining)
            self.stats.record_step(len(self.decoder.rows) + len(ended))
            for _ in range(self.steps_per_trip - 1):
                if ended or not self.decoder.rows or self._may_join():
                    break
                ended = self.decoder.tick([])
                self.stats.record_step(len(self.decoder.rows) + len(ended))
        except Exception as err:  # noqa: BLE001 - a bug here must not leave every request hanging
            log.exception("a decode step failed; failing the rows it held")
            failure = ApiError(500, f"generation failed: {type(err).__name__}: {err}")
            ended = self.decoder.fail_all(failure) + [r for r in joining if not r.ended]
            for row in ended:
                row.outcome = failure
        self.stats.record_end(time.monotonic() - started)
        return ended

    def _may_join(self) -> bool:
        """Whether waiting requests may take free rows now: the one admission rule, which both
        `_take_joining` and the multi-step trip (it stops for a join) follow."""
        free = self.decoder.slots - len(self.decoder.rows)
        if not self.pending or free == 0:
            return False
        if self.decoder.rows and not self._closing:
            group = min(self.admit_batch, self.decoder.slots)
            if len(self.pending) >= group > free:
                return False  # a queue: rows free up a step or two apart; take them a group at a time
            waited = time.monotonic() - self.pending[0].arrived
            if len(self.pending) < min(free, self.admit_batch) and waited < self.max_wait_s:
                return False  # wait a step or two for company
        return True

    def _take_joining(self) -> list[Row]:
        """Model thread: waiting requests for the free rows, oldest first; abandoned ones are dropped.
        (`pending` is appended on the event loop; deque appends and pops are atomic.)"""
        if not self._may_join():
            return []
        free = self.decoder.slots - len(self.decoder.rows)
        joining = []
        while self.pending and len(joining) < free:
            row = self.pending.popleft()
            if not row.abandoned:
                joining.append(row)
        return joining

    def _answer(self, ended: list[Row]) -> None:
        now = time.monotonic()
        results = []
        for row in ended:
            self.request_seconds.append(now - row.arrived)
            if row.future.done():
                continue  # timed out or abandoned
            if isinstance(row.outcome, BaseException):
                row.future.set_exception(row.outcome)
            else:
                row.future.set_result(row.outcome)
                results.append(row.outcome)
        if results:
            self.on_results(results)

    def snapshot(self) -> dict[str, Any]:
        micro = self.micro.snapshot()
        mine = self.stats.as_dict()
        live = len(self.decoder.rows) if self.decoder is not None else 0
        slots = self.decoder.slots if self.decoder is not None else 0
        return {**mine, "batching": "continuous",
                "queued": self.queued() + micro["queued"], "running": live + micro["running"],
                "max_batch": slots, "max_queue": self.max_queue,
                "rejected": mine["rejected"] + micro["rejected"], "timeouts": mine["timeouts"] + micro["timeouts"],
                "busy_seconds": round(mine["busy_seconds"] + micro["busy_seconds"], 3),
                "steps": mine["batches"], "micro_batches": micro["batches"],
                "batched_requests": mine["batched_requests"] + micro["batched_requests"],
                "requests_by_task": dict(collections.Counter(mine["requests_by_task"]) + collections.Counter(micro["requests_by_task"])),
                "kv_slots": slots, "kv_slots_used": live,
                "kv_row_positions": self.decoder.row_len if self.decoder is not None else 0,
                "kv_cache_bytes": self.decoder.cache_bytes() if self.decoder is not None else 0}
