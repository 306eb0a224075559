"""Greedy decoding with a static KV cache whose one-token step is replayed as a CUDA graph.

At batch 1 on a GPU, eager decoding is bound by the CPU: one token of OPT-2.7b launches some
700 small kernels, and launching them takes longer than the GPU needs to run them. Here every
tensor a step touches (the token, its position, the cache slot, the attention mask, the keys
and values, the chosen ids) lives at a fixed address, and the step reads where it is from
device tensors rather than Python ints. So one step, token choice included, is recorded once
as a CUDA graph and then replayed per token at the cost of a single launch. On CPU the same
step runs eagerly, which is how the tests check it against `generate`.

    from blip2.modeling.graphed import graphed_generate
    ids = graphed_generate(model, pixel_values, input_ids, max_new_tokens=30)

The step is the language model's own forward (`positions=` instead of the cache's count), so
any decoder-only family of `blip2.families` whose forward takes `Positions` runs here (OPT,
Llama). Greedy search only: the tokens of `model.generate(...)` with num_beams=1 and
do_sample=False, with eos, min_length / min_new_tokens and padding of finished rows as there.
Other settings, and encoder-decoder models (T5), raise ValueError.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from ..families import family_of
from ..generation import GenerationConfig, generate, resolve_config
from .attention import KVCache, Positions, padding_mask
from .blip2 import DecoderStepper
from .inference import fit_layouts

BUCKET = 64  # cache lengths round up to this, so prompts of similar length share one graph
WARMUP_STEPS = 2  # real steps run eagerly on a side stream before capture (cuBLAS sets up there)
CHECK_EVERY = 8  # with eos, replays between checks (each check waits for the GPU) for all rows done


def graphed_generate(model, pixel_values: Tensor, input_ids: Tensor | None = None,
                     attention_mask: Tensor | None = None, *, generation_config: GenerationConfig | None = None,
                     interpolate_pos_encoding: bool = False, cuda_graph: bool | None = None,
                     streamer=None, **generate_kwargs) -> Tensor:
    """`model.generate(pixel_values, input_ids, attention_mask, **generate_kwargs)` for greedy search,
    decoding with a static cache and, on CUDA, a captured step.

    Args:
        cuda_graph: None (default) captures on CUDA and runs eagerly elsewhere; True requires CUDA;
            False runs the static step eagerly (for debugging).
    Returns (batch, length) ids: BOS then the new tokens, exactly as `generate` returns them.
    The graph and its buffers stay cached on the language model for the next call of the same
    batch size and cache bucket (cache length rounded up to a multiple of 64).
    """
    if streamer is not None:
        raise ValueError("graphed_generate does not stream (tokens stay on the GPU until the end); use model.generate")
    base = generation_config or getattr(model, "generation_config", None) or resolve_config(model.config.text_config)
    config = base.updated(generate_kwargs)
    lm = model.language_model
    _check_supported(model, config)
    on_cuda = pixel_values.device.type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError("cuda_graph=True needs the model and pixel_values on a CUDA device")
    use_graph = on_cuda if cuda_graph is None else cuda_graph
    fit_layouts(model, generating=True)  # prepacked on CPU, as model.generate
    with torch.inference_mode():
        stepper, start_ids = model.stepper(pixel_values, input_ids, attention_mask, config, interpolate_pos_encoding)
        new_tokens = config.new_token_limit(start_ids.shape[1])
        if new_tokens == 1:  # no step to replay
            return generate(stepper, start_ids, config)
        logits = stepper.prefill()  # (B, V): the same prompt pass as generate's
        decoder = static_decoder(lm, stepper.cache, new_tokens)
        decoder.start(stepper, config, start_ids.shape[1])
        stepper = None  # its cache was copied; free it before decoding
        decoder.choose(logits)  # the first new token, from the prompt's logits
        done = 1
        if use_graph and decoder.graph is None:
            done += decoder.capture(lm, min(WARMUP_STEPS, new_tokens - 1))
        while done < new_tokens:
            if use_graph:
                decoder.replay()
            else:
                decoder.step(lm)
            done += 1
            if decoder.may_stop(done) and not bool(decoder.unfinished.any()):
                break
        return torch.cat([start_ids, decoder.result(done)], dim=1)


def _check_supported(model, config: GenerationConfig) -> None:
    lm = model.language_model
    if not family_of(model.config).decoder_only:
        raise ValueError(f"graphed_generate supports decoder-only language models only, not {type(lm).__name__}")
    scaling = getattr(model.config.text_config, "rope_scaling", None) or {}
    if scaling.get("type") == "dynamic":
        # Its rotary base follows the sequence's length, which a static step does not know.
        raise ValueError("graphed_generate does not support dynamic rope scaling (rope_scaling type 'dynamic'); "
                         "use model.generate")
    if lm.training:
        raise ValueError("graphed_generate needs the model in eval mode (dropout would differ per step): "
                         "call model.eval()")
    unsupported = {
        "num_beams": (config.num_beams, 1), "do_sample": (config.do_sample, False),
        "repetition_penalty": (config.repetition_penalty, 1.0),
        "no_repeat_ngram_size": (config.no_repeat_ngram_size, 0),
        "forced_bos_token_id": (config.forced_bos_token_id, None),
        "forced_eos_token_id": (config.forced_eos_token_id, None),
        "num_return_sequences": (config.num_return_sequences, 1),
    }
    for name, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(f"graphed_generate does greedy search only: {name}={value!r} is not supported "
                             f"(only {default!r}); use model.generate")


# The decoder of each language model's last call, for the next call of the same shape. Kept
# beside the model rather than on it; weak, so it goes when the language model does.
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, StaticDecoder]" = weakref.WeakKeyDictionary()


def static_decoder(lm, prompt_cache: KVCache, new_tokens: int) -> "StaticDecoder":
    """The decoder kept for `lm` if it fits this call (same batch, bucket, weights), else a new one."""
    B = prompt_cache.k[0].shape[0]
    max_len = -(-(prompt_cache.length + new_tokens) // BUCKET) * BUCKET
    key = (B, max_len, prompt_cache.k[0].dtype, prompt_cache.k[0].device,
           # a graph reads weights by address: moved or replaced weights need a new one
           tuple(t.data_ptr() for t in itertools.chain(lm.parameters(), lm.buffers())))
    decoder = _DECODERS.get(lm)
    if decoder is None or decoder.key != key:
        _DECODERS.pop(lm, None)  # free the old graph and cache first
        decoder = _DECODERS[lm] = StaticDecoder(lm, key)
    return decoder


class StaticDecoder:
    """Static buffers for one (batch, cache length) and the one-token step over them.

    The step is the language model's own forward, given `Positions` read from these buffers
    (per row: each row has its own slot and position), so nothing in it is a Python int and a
    CUDA graph of it stays valid from one token to the next. It keeps no reference to the
    language model (see `_DECODERS`): each call is handed it.
    """

    def __init__(self, lm, key) -> None:
        B, max_len, dtype, device, _ = key
        self.key, self.graph = key, None
        self.cache = lm.new_cache(B, max_len, dtype=dtype, device=device)  # k, v: [layers] of (B, H, max_len, D)
        self.mask = torch.zeros(B, 1, 1, max_len, dtype=dtype, device=device)  # additive, over the whole cache
        self.token = torch.zeros(B, dtype=torch.long, device=device)  # the token fed next
        self.position = torch.zeros(B, 1, dtype=torch.long, device=device)  # its position (unmasked tokens before it)
        self.slot = torch.zeros(B, 1, dtype=torch.long, device=device)  # the cache slot it is written to
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # new tokens chosen so far
        self.new_ids = torch.zeros(B, max_len, dtype=torch.long, device=device)  # (B, max_len) chosen tokens
        self.unfinished = torch.ones(B, dtype=torch.bool, device=device)
        self.is_eos = torch.zeros(lm.config.vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.min_new = torch.zeros(1, dtype=torch.long, device=device)  # eos banned while count < min_new

    def start(self, stepper: DecoderStepper, config: GenerationConfig, start_len: int) -> None:
        """Takes over a prefilled stepper: copies its cache and sets every buffer for this call."""
        prompt = stepper.mask  # (B, T) 1/0 over queries + text
        T = prompt.shape[1]
        for mine, theirs in zip(self.cache.k + self.cache.v, stepper.cache.k + stepper.cache.v):
            mine[:, :, :T] = theirs[:, :, :T]
        # Slots past the prompt are hidden until written; stale values from an earlier call stay hidden.
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        self.mask[..., :T] = padding_mask(prompt, self.mask.dtype)
        # As Positions.after: the next token's position counts the unmasked tokens before it.
        self.position.copy_(prompt.sum(dim=1, keepdim=True))
        self.slot.fill_(T)
        self.count.zero_()
        self.unfinished.fill_(True)
        eos = config.eos_ids
        self.has_eos = bool(eos)
        self.is_eos.zero_()
        self.is_eos[[e for e in eos if e < self.is_eos.shape[0]]] = True  # larger ids are never chosen
        pad = config.resolved_pad_token_id
        self.pad.fill_(pad if pad is not None else 0)
        # The processors ban eos while the history is shorter than min_length or min_new_tokens.
        self.min_new_host = max(config.min_new_tokens or 0, config.min_length - start_len) if eos else 0
        self.min_new.fill_(self.min_new_host)

    # ---- the step: everything below reads and writes the static buffers only ----
    def choose(self, logits: Tensor) -> None:
        """Greedy choice from logits (B, V), with generate's eos rules; appends it to new_ids."""
        banned = self.is_eos & (self.count < self.min_new)  # (V,)
        tokens = torch.argmax(logits.masked_fill(banned, float("-inf")), dim=-1)  # (B,)
        tokens = torch.where(self.unfinished, tokens, self.pad)  # finished rows get padding
        self.unfinished &= ~self.is_eos[tokens]
        self.new_ids.index_copy_(1, self.count, tokens[:, None])
        self.token.copy_(tokens)
        self.count += 1

    def step(self, lm) -> None:
        """Feeds each row's `token` at its `position` into its `slot`, then chooses the next token."""
        self.mask.scatter_(3, self.slot[:, None, None, :], 0.0)  # each new token sees itself
        at = Positions(ids=self.position, slots=self.slot, mask=self.mask)
        logits = lm(lm.embed(self.token[:, None]), cache=self.cache, positions=at, last_logits=1).logits
        self.choose(logits[:, -1])  # (B, V)
        self.position += 1
        self.slot += 1

    # ---- CUDA graph ----
    def capture(self, lm, warmup: int) -> int:
        """Runs `warmup` real steps on a side stream, then records one step; returns the steps run."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step(lm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: the buffers are left as they were
            self.step(lm)
        self.graph = graph
        return warmup

    def replay(self) -> None:
        self.graph.replay()

    # ---- the end ----
    def may_stop(self, done: int) -> bool:
        """Whether to check (and wait for) all rows having finished after `done` tokens."""
        return self.has_eos and done > self.min_new_host and done % CHECK_EVERY == 0

    def result(self, done: int) -> Tensor:
        """(B, n) new tokens, cut where generate stops: at the step where the last row ended."""
        ids = self.new_ids[:, :done].clone()
        if self.has_eos:
            ends = self.is_eos[ids]  # (B, done)
            if bool(ends.any(dim=1).all()):
                first = ends.int().argmax(dim=1)  # each row's first eos
                ids = ids[:, : int(first.max()) + 1]
        return ids
