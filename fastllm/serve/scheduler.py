"""Continuous batching: one engine thread owns the model and a PagedKVCache of `max_seqs` rows, and between
decode steps admits waiting requests into free rows, so that a new request joins the running batch instead of
waiting for it to drain.

Each loop iteration:
    1. drop cancelled requests (client gone) and free their rows;
    2. admit waiting requests into the lowest free rows, all with one model.prefill(prompts, cache, rows=...)
       (the other rows are left alone), and sample each one's first token;
    3. one model.decode step over rows [0, highest live row] (a PagedKVCache.first_rows view: rows past the
       last live one cost nothing) and sample every live row with its own parameters (sample_rows);
    4. each row's token goes through its TextStream (incremental text, stop strings); a row that produced EOS,
       a stop string or max_tokens tokens is finished and released, and its slot is free for step 2.
Results reach each request's asyncio.Queue through loop.call_soon_threadsafe, as Event tuples:
    ("text", piece, logprobs)   ("done", finish_reason)  finish_reason "stop" (EOS or stop string) or "length"
    ("error", http_status, message)
logprobs: for a request that asked for them (Request.logprobs = k), the tokens behind this piece (those
sampled since the previous piece; an EOS is not reported) as [(id, logprob, [(top id, logprob)] * k)], else [].
Penalties are per row: the engine keeps, per cache row, the tokens seen (prompt + output; repetition penalty)
and the generated-token counts (presence/frequency), allocated when a request first needs them.
The KV cache is paged (runtime/kv_cache.PagedKVCache): `max_seqs` rows share a pool of `kv_cache_tokens`
positions in blocks of `block_size`. Admission is first come, first served: the request at the head of the queue
is admitted when a row is free and the pool has blocks for its prompt + max_tokens, which it reserves up front,
so an admitted request never runs out of cache mid-generation and nothing is ever preempted; when it finishes
or is cancelled its blocks go back to the pool. Short requests therefore cost only what they use, and more of
them run at once than rows of context_len would allow in the same memory.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import traceback
from dataclasses import dataclass, field

import torch

from ..runtime.cpu_graph import CpuGraphStep, cpu_graphs_enabled
from ..runtime.generate import TextStream
from ..runtime.inputs import token_ids
from ..runtime.kv_cache import SCRATCH_BLOCK
from ..runtime.sampling import SamplingParams, sample_rows, token_logprobs


DEFAULT_FULL_ROWS = 8  # the default pool holds this many sequences of context_len positions


class Rejected(Exception):
    """A request the server cannot take now or at all; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Request:
    """One generation. The event-loop side reads `queue`; the engine thread owns everything else."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generated: int = 0          # tokens sampled so far (an EOS included)
    row: int = -1
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    last: int = 0               # the token the next decode step feeds
    logprobs: int | None = None  # report log-probabilities with this many top alternatives (None: don't)
    pending: list = field(default_factory=list)  # logprob entries not yet sent with a piece of text

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """engine = Engine(llm, max_seqs=8, max_queue=64, context_len=2048); engine.start()
    req = engine.submit(prompt_ids, max_tokens, SamplingParams(...), stop=("\\n",))   # on the event loop
    ... await req.queue.get() ...;  engine.cancel(req);  engine.stop()

    max_seqs: sequences decoded together (cache rows); max_queue: requests waiting for a row or for cache
    blocks (more -> 429); context_len: positions per sequence (prompt + max_tokens must fit, else 400);
    kv_cache_tokens: positions in the paged cache's pool, at least context_len (default
    min(max_seqs, DEFAULT_FULL_ROWS) * context_len); block_size: positions per cache block."""

    def __init__(self, llm, max_seqs: int = 16, max_queue: int = 64, context_len: int | None = None,
                 kv_cache_tokens: int | None = None, block_size: int = 16):
        limit = llm.config.max_seq_len
        context_len = min(limit, 2048) if context_len is None else context_len
        for name, v in (("max_seqs", max_seqs), ("max_queue", max_queue), ("context_len", context_len),
                        ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if context_len > limit:
            raise ValueError(f"context_len {context_len} exceeds the model's context of {limit} tokens")
        if kv_cache_tokens is None:
            kv_cache_tokens = min(max_seqs, DEFAULT_FULL_ROWS) * context_len
        if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < context_len:
            raise ValueError(f"kv_cache_tokens must be an int >= context_len ({context_len}), so that the longest "
                             f"request fits, got {kv_cache_tokens!r}")
        if getattr(llm.model, "rotary", None) is not None and llm.config.rope_type == "dynamic":
            # prefill re-derives the shared rotary tables from the admitted prompts, which would change them
            # under the rows already running
            raise ValueError("models with dynamic (NTK) rotary scaling cannot be served with continuous batching")
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.eos_ids = set(llm.eos_ids)
        self.max_seqs, self.max_queue, self.context_len = max_seqs, max_queue, context_len
        self.device = self.model.tok_embeddings.weight.device
        num_blocks = 1 + -(-kv_cache_tokens // block_size)                          # + the scratch block
        self.cache = self.model.new_cache(max_seqs, context_len, block_size=block_size, num_blocks=num_blocks)
        self.rows: list[Request | None] = [None] * max_seqs
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.peak_running, self.cancelled = 0, 0     # counters for /health (and the tests)
        self.thread: threading.Thread | None = None
        self.dead: str | None = None                  # why the engine thread stopped on an unexpected error
        self.seen: torch.Tensor | None = None         # (max_seqs, V) bool, rows with a repetition penalty
        self.counts: torch.Tensor | None = None       # (max_seqs, V) int32, rows with presence/frequency
        self.graphs = cpu_graphs_enabled(self.model) is None
        self.steps: dict[int, CpuGraphStep] = {}      # CPU: the decode step of the first n rows, per n

    # ---- the event-loop side -----------------------------------------------------------------------
    def check(self, n_prompt: int, max_tokens: int) -> None:
        """Rejected(400) unless a prompt of n_prompt tokens and max_tokens new ones fit a row."""
        if n_prompt < 1:
            raise Rejected(400, "the prompt is empty (no tokens)")
        if n_prompt + max_tokens > self.context_len:
            raise Rejected(400, f"this model's context is {self.context_len} tokens; the prompt has {n_prompt} "
                                f"and max_tokens asks for {max_tokens} more ({n_prompt + max_tokens} in all): "
                                f"shorten the prompt or lower max_tokens")

    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop=(),
               logprobs: int | None = None) -> Request:
        """Queue a request (call on the event loop that will read its queue); logprobs = k reports each
        token's log-probability and the k most likely alternatives."""
        self.check(len(prompt), max_tokens)
        try:  # an id past the vocabulary would fail the whole batch's step, every running request with it
            prompt = token_ids(prompt, self.model.cfg.vocab_size, "prompt")
        except (TypeError, ValueError) as e:
            raise Rejected(400, str(e)) from None
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= self.model.cfg.vocab_size):
            raise Rejected(400, f"logprobs must be an int in [0, {self.model.cfg.vocab_size}], got {logprobs!r}")
        req = Request(prompt, max_tokens, params, tuple(stop), asyncio.get_running_loop(),
                      logprobs=logprobs)
        with self.cv:
            if self.dead is not None:
                raise Rejected(503, f"the generation engine stopped: {self.dead}")
            if self.stopping or self.thread is None:
                raise Rejected(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Rejected(429, f"the server is busy: {len(self.waiting)} requests are already waiting "
                                    f"(--max-queue {self.max_queue}); retry later")
            self.waiting.append(req)
            self.cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: drop the request (its row is freed before the next step)."""
        req.cancelled = True
        with self.cv:
            if req in self.waiting:
                self.waiting.remove(req)
                self.cancelled += 1

    def stats(self) -> dict:
        with self.cv:
            return {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting),
                    "peak_running": self.peak_running, "cancelled": self.cancelled, "max_seqs": self.max_seqs, "max_queue": self.max_queue, "context_len": self.context_len,
                    "kv_blocks_free": len(self.cache.free), "kv_blocks": self.cache.num_blocks - 1,
                    "kv_block_size": self.cache.block_size}

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="fastllm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish the current step, then answer every request still waiting or running with 503."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join()
        for req in [*self.waiting, *(r for r in self.rows if r is not None)]:
            req.send("error", 503, "the server is shutting down")
        self.waiting.clear()
        self.rows = [None] * self.max_seqs

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # outside a step (a step's own failures are handled in _serve): fail everyone
            traceback.print_exc()
            with self.cv:
                self.dead = f"{type(e).__name__}: {e}"
                for r in [*self.rows, *self.waiting]:
                    if r is not None:
                        r.send("error", 503, f"the generation engine stopped: {self.dead}")
                self.rows = [None] * self.max_seqs
                self.waiting.clear()

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not self.stopping and not self.waiting and not any(self.rows):
                        self.cv.wait()
                    if self.stopping:
                        return
                    for r in self.rows:
                        if r is not None and r.cancelled:
                            self._release(r)
                            self.cancelled += 1
                    free = [i for i, r in enumerate(self.rows) if r is None]
                    admit = []
                    while self.waiting and len(admit) < len(free):  # first come, first served
                        req, row = self.waiting[0], free[len(admit)]
                        if not self.cache.reserve(row, len(req.prompt) + req.max_tokens):
                            break  # the pool is short of blocks: wait for running requests to finish
                        admit.append(self.waiting.popleft())
                        req.row, self.rows[row] = row, req
                    self.peak_running = max(self.peak_running, sum(r is not None for r in self.rows))
                try:
                    self._step(admit)
                except Exception as e:  # a model failure fails the running requests, never the server
                    traceback.print_exc()
                    with self.cv:
                        for r in self.rows:
                            if r is not None:
                                r.send("error", 500, f"generation failed: {type(e).__name__}: {e}")
                                self._release(r)

    def _release(self, req: Request) -> None:
        """Host bookkeeping only (so it cannot fail after a device error): the row's blocks go back to the pool;
        a free row's length and block table are reset on the device by the next step (idle rows of the decoded
        prefix) or by the reserve and prefill that reuse it."""
        self.rows[req.row] = None
        self.cache.release(req.row, device=False)

    def _step(self, admit: list[Request]) -> None:
        if admit:
            logits = self.model.prefill([r.prompt for r in admit], self.cache, rows=[r.row for r in admit])
            for r in admit:
                r.stream = TextStream(self.tokenizer, r.stop)
                r.generator = r.params.generator(self.device)
                self._reset_penalty_state(r)
            self._take(admit, logits)                                                  # (N, V)
        live = [r for r in self.rows if r is not None]
        if not live:
            return
        n = max(r.row for r in live) + 1
        view = self.cache.first_rows(n)
        idle = [i for i in range(n) if self.rows[i] is None]
        if idle:  # a free row inside the prefix rewrites slot 0 of the scratch block, harmlessly, instead of growing
            view.lengths[idle] = 0
            view.block_table[idle] = SCRATCH_BLOCK
        view.longest = max(len(r.prompt) + r.generated - 1 for r in live)
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        tokens[[r.row for r in live]] = torch.tensor([r.last for r in live], device=self.device)
        logits = self._decode(tokens, view)                                            # (n, V)
        self._take(live, logits[[r.row for r in live]])

    def _decode(self, tokens: torch.Tensor, view) -> torch.Tensor:
        """model.decode(tokens, view); on the CPU replayed from a CPU graph per row count n (fastllm/runtime/
        cpu_graph.py): the view of the first n rows has the same lengths, block table and pool from step to
        step, so the graph recorded on one view replays on the next."""
        if not self.graphs:
            return self.model.decode(tokens, view)
        step = self.steps.get(view.batch)
        if step is None:
            step = self.steps[view.batch] = CpuGraphStep(self.model, view)
        step.cache = view
        return step(tokens)

    def _state(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The per-row penalty state `name` ("seen" or "counts"), (max_seqs, V), allocated on first use."""
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(self.max_seqs, self.model.cfg.vocab_size, dtype=dtype,
                                            device=self.device))
        return getattr(self, name)

    def _reset_penalty_state(self, r: Request) -> None:
        """A newly admitted request's row of the penalty state: its prompt seen, no token generated."""
        if r.params.repetition_penalty != 1.0:
            seen = self._state("seen", torch.bool)
            seen[r.row] = False
            seen[r.row, torch.tensor(r.prompt, device=self.device)] = True
        if r.params.counts_tokens:
            self._state("counts", torch.int32)[r.row] = 0

    def _take(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits (N, V) and pass it on."""
        rows = torch.tensor([r.row for r in reqs], device=self.device)
        rep = self.seen is not None and any(r.params.repetition_penalty != 1.0 for r in reqs)
        cnt = self.counts is not None and any(r.params.counts_tokens for r in reqs)
        chosen = sample_rows(logits.float(), [r.params for r in reqs], [r.generator for r in reqs],
                             self.seen[rows] if rep else None, self.counts[rows] if cnt else None)  # (N,)
        if rep:
            self.seen[rows, chosen] = True
        if cnt:
            self.counts[rows, chosen] += 1
        entries = self._logprobs(reqs, logits, chosen)
        for r, t, entry in zip(reqs, chosen.tolist(), entries):
            r.last, r.generated = t, r.generated + 1
            reason = None
            if t in self.eos_ids:
                reason = "stop"
            else:
                if entry is not None:
                    r.pending.append(entry)
                piece = r.stream.push(t)
                if piece:
                    self._send_text(r, piece)
                if r.stream.stopped:
                    reason = "stop"
            if reason is None and r.generated >= r.max_tokens:
                reason = "length"
            if reason is not None:
                tail = r.stream.finish()
                if tail or r.pending:
                    self._send_text(r, tail)
                with self.cv:  # the blocks are back in the pool before the client hears it is done
                    self._release(r)
                r.send("done", reason)

    @staticmethod
    def _send_text(r: Request, piece: str) -> None:
        r.send("text", piece, r.pending)
        r.pending = []

    @staticmethod
    def _logprobs(reqs: list[Request], logits: torch.Tensor, chosen: torch.Tensor) -> list:
        """Per request, None or (chosen id, its logprob, [(id, logprob)] of its top `logprobs` tokens)."""
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        out = [None] * len(reqs)
        if want:
            idx = torch.tensor(want, device=logits.device)
            k = max(reqs[i].logprobs for i in want)
            lp, top_lp, top_ids = (x.tolist() for x in token_logprobs(logits[idx], chosen[idx], k))
            for j, i in enumerate(want):
                n = reqs[i].logprobs
                out[i] = (int(chosen[i]), lp[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
        return out
