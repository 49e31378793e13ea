"""The eviction simulator: the paper's teacher-forced chunked forward, run through the serving step.

``simulate(model, input_ids, *, prompt_len, policy, budget, interval, scorer=None, seed=0,
capture=None, victims_override=None) -> SimResult``

The first ``budget`` tokens go through the model in one forward with full attention; the rest in
chunks of ``interval`` queries, each attending to the compressed cache plus itself (causal). The
cache is compressed after each chunk whenever the live window reaches ``budget + interval``, back
to ``budget`` entries per (layer, KV head), the newest ``interval`` protected. Every attention and
every eviction is the serving step's own code: ``foresightkv.engine.EvictionEngine.attend`` over a
paged cache (block size 1), i.e. ``window_stats`` for the statistics, the policy's batched scores
(``foresightkv.engine.victims``: ``scorer_mlp`` for the learned scorer) and ``select_survivors`` for
the victims, ``compact`` for the in-place compaction, with keys cached after RoPE at their original
position (positions stay logical); the hooks below see the batch through the engine's ``on_evict``. The features a scorer sees here are therefore bit for bit those it sees when
serving.

Policies (``POLICIES``): ``full`` (no eviction), ``golden`` (Golden Eviction: the victims the Rust
``golden_eviction`` chose from the same sequence's full-cache attention), ``foresight`` (the learned
scorer: ``scorer`` = checkpoint directory or ``ScorerCheckpoint``; deterministic top-L), ``h2o``,
``snapkv``, ``tova``, ``rkv``, ``streaming`` (StreamingLLM), ``random`` (seeded by ``seed``).

Hooks, for training:

- ``capture(event)`` is called at every eviction of every layer with an ``EvictionEvent``: the
  layer, the eviction index, the KV head count, the candidates' (the unprotected live entries)
  keys and values ``[H, N, D]``, their statistics ``[H, N, G, 8]`` exactly as the serving step feeds
  ``scorer_mlp``, their original positions ``[H, N]``, and, when available (policy ``golden``, or a
  ``golden`` run whose trajectory these candidates are on), their Golden future scores ``[H, N]``.
- ``victims_override(event)`` returns the victims of each KV head (``H`` sequences of
  ``event.num_evict`` distinct indices into the candidates); the policy is then not consulted.

``ce[t]`` / ``entropy[t]`` (``[T - 1]``) are the cross-entropy of token ``t + 1`` and the entropy of
the model's prediction at position ``t``. ``record_full`` runs the full-cache pass once and returns
the ``foresightkv.Trace`` of its queries, keys and values (for Golden Eviction and the attention-mass
fidelity); ``GoldenRun`` holds one Golden Eviction of a sequence for reuse across runs."""

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .. import kernels
from .._native import ScorerCheckpoint, Trace, golden_eviction
from ..engine import EngineConfig, EvictionBatch, EvictionEngine, StepRequest
from ..errors import ConfigError, InvalidArgumentError, ShapeError
from .model import ModelShape, layer_index, model_device, routed_attention

#: Policy names the simulator accepts.
POLICIES = (
    "full",
    "golden",
    "foresight",
    "h2o",
    "snapkv",
    "tova",
    "rkv",
    "streaming",
    "random",
)

# The engine policy behind each name. Golden's victims always come from the Golden run, so its
# engine policy ("random") only supplies the schedule and is never asked for victims.
_ENGINE_POLICY = {
    "full": "full_cache",
    "golden": "random",
    "foresight": "foresight",
    "h2o": "h2o",
    "snapkv": "snapkv",
    "tova": "tova",
    "rkv": "rkv",
    "streaming": "streaming_llm",
    "random": "random",
}


@dataclass
class EvictionEvent:
    """One eviction of one layer (all KV heads), as the serving step sees it. ``N`` candidates =
    the live window minus the ``num_protected`` newest entries; ``keys``/``values`` ``[H, N, D]``
    float32, ``stats`` ``[H, N, G, 8]`` float32, ``positions`` ``[H, N]`` int64 (original positions,
    ascending per head), ``future`` ``[H, N]`` Golden future scores or None, ``queries`` ``[M, Hq,
    D]`` the newest ``M <= max(L, 8)`` queries since the previous eviction (the engine's query ring;
    older ones were folded into the statistics as they left it)."""

    layer: int
    eviction: int
    num_kv_heads: int
    seq_len: int
    num_evict: int
    num_protected: int
    keys: torch.Tensor
    values: torch.Tensor
    stats: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    future: Optional[torch.Tensor] = None


@dataclass
class SimResult:
    """Per-token cross-entropy and entropy under eviction (``[T - 1]`` float32 each), the schedule,
    the number of evictions per layer, and the final kept positions of each layer ``[H, live]``."""

    ce: torch.Tensor
    entropy: torch.Tensor
    prompt_len: int
    policy: str
    budget: int
    interval: int
    evictions: int
    kept: List[torch.Tensor] = field(default_factory=list)


class GoldenRun:
    """Golden Eviction of one sequence at one (budget, interval), from the Rust ``golden_eviction``
    over the sequence's full-cache trace: per (layer, KV head, sequence length) the candidates'
    positions, their future scores and the victims' positions. ``prompt_len`` > ``budget``: the
    serving schedule, the prompt compressed right after prefill (``generate``); 0: the simulator's
    chunked schedule."""

    def __init__(
        self, trace: Trace, budget: int, interval: int, *, prompt_len: int = 0
    ) -> None:
        res = golden_eviction(trace, budget, interval, prompt_len=prompt_len)
        self.budget, self.interval, self.prompt_len = budget, interval, prompt_len
        self.length = int(trace.shape["len"])
        self.fidelity = res["fidelity"]
        self._recs: Dict[
            Tuple[int, int, int], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        for r in res["records"]:
            key = (int(r["layer"]), int(r["kv_head"]), int(r["seq_len"]))
            cand = torch.tensor(r["candidates"], dtype=torch.int64)
            future = -torch.tensor(r["scores"], dtype=torch.float32)
            self._recs[key] = (
                cand,
                future,
                torch.tensor(r["victims"], dtype=torch.int64),
            )

    @property
    def num_records(self) -> int:
        """Evictions recorded (layers x KV heads x evictions)."""
        return len(self._recs)

    def future(
        self, layer: int, seq_len: int, positions: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Future scores ``[H, N]`` of candidates ``positions`` ``[H, N]`` at the eviction at
        ``seq_len``, or None when they are not exactly the Golden trajectory's candidates."""
        rows = []
        for kh in range(positions.shape[0]):
            rec = self._recs.get((layer, kh, seq_len))
            if (
                rec is None
                or rec[0].numel() != positions.shape[1]
                or not torch.equal(rec[0], positions[kh])
            ):
                return None
            rows.append(rec[1])
        return torch.stack(rows)

    def victims(self, event: EvictionEvent) -> List[List[int]]:
        """The Golden victims of ``event`` as indices into its candidates."""
        out = []
        for kh in range(event.num_kv_heads):
            rec = self._recs.get((event.layer, kh, event.seq_len))
            if rec is None and event.seq_len == self.length:
                # Golden makes no eviction at the end of the sequence (no query follows it, so
                # nothing depends on it); the serving schedule still does one: drop the oldest.
                out.append(list(range(event.num_evict)))
                continue
            if rec is None:
                raise InvalidArgumentError(
                    f"no Golden record for layer {event.layer} head {kh} at length {event.seq_len} "
                    f"(budget {self.budget}, interval {self.interval})"
                )
            cand, _, vic = rec
            if not torch.equal(cand, event.positions[kh]):
                raise InvalidArgumentError(
                    f"layer {event.layer} head {kh} at length {event.seq_len}: the candidates are not the Golden "
                    "trajectory's (was the run driven by another policy?)"
                )
            out.append(torch.searchsorted(cand, vic).tolist())
        return out


class _SimEngine(EvictionEngine):
    """The serving step plus the two training hooks, through the engine's ``on_evict`` hook (the
    batched inputs of each layer's victim choice), per request key (each simulator run of the
    engine's batch has its own); with no hook it is the serving step."""

    def __init__(self, config, *, checkpoint, hooks) -> None:
        # hooks: request key -> (capture, override, golden)
        self._hooks = dict(hooks)
        use = any(c is not None or o is not None for c, o, _ in self._hooks.values())
        super().__init__(config, block_size=1, checkpoint=checkpoint, on_evict=self._on_eviction if use else None)

    def _on_eviction(self, batch: EvictionBatch) -> Optional[torch.Tensor]:
        """One ``EvictionEvent`` per due request of ``batch`` for its run's ``capture``; the survivors
        its ``victims_override`` names (None: the policy chooses; the runs of one engine either all
        override or none does)."""
        h = batch.num_kv_heads
        keys, values, stats = (batch.gather(t) for t in (batch.key_cache, batch.value_cache, batch.stats))
        out = None
        for j in range(batch.num_seqs):
            capture, override, golden = self._hooks[batch.keys[j]]
            if capture is None and override is None:
                continue
            live, num_evict = batch.live[j], batch.num_evict_host[j]
            n = live - batch.num_protected
            seq_len = batch.lengths[j]
            cand_pos = batch.positions[j, :, :n].cpu()
            event = EvictionEvent(
                layer=batch.layer,
                eviction=batch.evictions[j],
                num_kv_heads=h,
                seq_len=seq_len,
                num_evict=num_evict,
                num_protected=batch.num_protected,
                keys=keys[j, :n].float().transpose(0, 1).contiguous().cpu(),
                values=values[j, :n].float().transpose(0, 1).contiguous().cpu(),
                stats=stats[j, :n].float().transpose(0, 1).contiguous().cpu(),
                positions=cand_pos,
                queries=batch.queries[j, : batch.num_queries_host[j]].float().cpu(),
                future=None if golden is None else golden.future(batch.layer, seq_len, cand_pos),
            )
            if capture is not None:
                capture(event)
            if override is not None:
                if out is None:
                    out = torch.zeros(tuple(batch.positions.shape), dtype=torch.int32)
                out[j] = _override_survivors(override(event), h, n, live, num_evict, batch.max_live)
        return None if out is None else out.to(batch.positions.device)


def _override_survivors(victims, h: int, n: int, live: int, num_evict: int, max_live: int) -> torch.Tensor:
    """Survivor rows ``[H, max_live]`` (int32, kept window slots ascending) of the victims a
    ``victims_override`` returned (per head, ``num_evict`` distinct indices into the ``n``
    candidates), checked."""
    out = torch.zeros((h, max_live), dtype=torch.int32)
    if len(victims) != h:
        raise ShapeError(f"victims_override returned {len(victims)} heads, the layer has {h}")
    for kh, vs in enumerate(victims):
        v = torch.as_tensor(vs, dtype=torch.long).flatten()
        if v.numel() != num_evict or (v.numel() and (int(v.min()) < 0 or int(v.max()) >= n)):
            raise InvalidArgumentError(
                f"victims_override head {kh}: need {num_evict} indices in [0, {n}), got {v.tolist()}"
            )
        gone = torch.zeros(live, dtype=torch.bool)
        gone[v] = True
        if int(gone.sum()) != num_evict:
            raise InvalidArgumentError(f"victims_override head {kh}: repeated indices {v.tolist()}")
        keep = torch.nonzero(~gone).flatten().to(torch.int32)
        out[kh, : keep.numel()] = keep
    return out


def _engine_config(
    policy: str, budget: int, interval: int, scorer: Any, seed: int
) -> Tuple[EngineConfig, Any]:
    """The engine configuration and the checkpoint object behind a simulator policy name."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    checkpoint = None
    ck_path = None
    if policy == "foresight":
        if scorer is None:
            raise ConfigError(
                "policy 'foresight' needs scorer= (a checkpoint directory or ScorerCheckpoint)"
            )
        if isinstance(scorer, ScorerCheckpoint):
            checkpoint, ck_path = scorer, "<in memory>"
        else:
            ck_path = os.fspath(scorer)
            checkpoint = ScorerCheckpoint.load(ck_path)
    cfg = EngineConfig(
        budget=budget,
        interval=interval,
        policy=_ENGINE_POLICY[policy],
        checkpoint=ck_path,
        sample=False,
        seed=seed,
    )
    cfg.validate(1)
    return cfg, checkpoint


def chunks(length: int, budget: int, interval: int) -> List[Tuple[int, int]]:
    """The forward chunks ``[start, end)``: ``[0, budget)`` then ``interval`` at a time."""
    out = [(0, min(budget, length))]
    s = out[0][1]
    while s < length:
        out.append((s, min(s + interval, length)))
        s = out[-1][1]
    return out


@dataclass
class SimRun:
    """One sequence under one policy, for ``simulate_many`` (the arguments of ``simulate``).
    ``request``: the request part of the victim RNG key (a run's sampled or random victims depend on
    it and ``seed``, never on the runs batched with it)."""

    input_ids: Union[torch.Tensor, Sequence[int]]
    prompt_len: int
    policy: str
    budget: int
    interval: int
    scorer: Any = None
    seed: int = 0
    capture: Optional[Callable[[EvictionEvent], None]] = None
    victims_override: Optional[Callable[[EvictionEvent], Sequence[Sequence[int]]]] = None
    golden: Optional[GoldenRun] = None
    record: Optional[List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = None
    request: int = 0


def simulate(
    model: Any,
    input_ids: Union[torch.Tensor, Sequence[int]],
    *,
    prompt_len: int,
    policy: str,
    budget: int,
    interval: int,
    scorer: Any = None,
    seed: int = 0,
    capture: Optional[Callable[[EvictionEvent], None]] = None,
    victims_override: Optional[
        Callable[[EvictionEvent], Sequence[Sequence[int]]]
    ] = None,
    golden: Optional[GoldenRun] = None,
    record: Optional[
        List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    ] = None,
) -> SimResult:
    """Teacher-forced chunked forward of ``input_ids`` ``[T]`` under ``policy`` (see the module
    docstring). ``golden``: a precomputed ``GoldenRun`` for this sequence and schedule (policy
    ``golden`` computes one when None; other policies use it for the events' future scores).
    ``record``: a list that receives, per layer, the (q, k, v) of every chunk (full-cache trace)."""
    run = SimRun(input_ids, prompt_len, policy, budget, interval, scorer, seed, capture, victims_override, golden, record)
    return simulate_many(model, [run])[0]


@dataclass
class _Lane:
    """A run inside ``run_packed``: its tokens, engine, request key, schedule and cache offset."""

    ids: torch.Tensor
    engine: EvictionEngine
    key: int
    budget: int
    interval: int
    record: Optional[list] = None
    rng_key: Optional[int] = None


def simulate_many(model: Any, runs: Sequence[SimRun]) -> List[SimResult]:
    """``simulate`` of every run, all in one packed forward per step (the model sees the runs' chunks
    concatenated, each attending only to its own cache, as a serving engine batches requests): runs of
    the same policy, schedule and scorer share one serving-step engine as its batch's requests. Each
    run's result equals its own ``simulate`` (the model's rows are independent; only float summation
    order in the batched matrix products can differ)."""
    if not runs:
        return []
    prepared = []
    for r in runs:
        ids = torch.as_tensor(r.input_ids, dtype=torch.long).flatten()
        t = ids.numel()
        if t < 2:
            raise ShapeError(f"a sequence of {t} tokens has no next-token loss")
        if not 0 <= r.prompt_len <= t:
            raise InvalidArgumentError(f"prompt_len {r.prompt_len} outside [0, {t}]")
        cfg, checkpoint = _engine_config(r.policy, r.budget, r.interval, r.scorer, r.seed)
        golden, override = r.golden, r.victims_override
        if r.policy == "golden":
            if golden is None:
                golden = GoldenRun(record_full(model, ids)[0], r.budget, r.interval)
            if override is None:
                override = golden.victims
        prepared.append((ids, cfg, checkpoint, golden, override))
    # One engine per (configuration, scorer, hook kind): its runs are its requests, keyed by run index.
    groups: Dict[Any, List[int]] = {}
    for i, (_, cfg, checkpoint, _, override) in enumerate(prepared):
        gkey = (cfg.policy, cfg.budget, cfg.interval, cfg.seed, id(checkpoint) if checkpoint is not None else None,
                override is not None)
        groups.setdefault(gkey, []).append(i)
    engines: Dict[int, _SimEngine] = {}
    for members in groups.values():
        _, cfg, checkpoint, _, _ = prepared[members[0]]
        hooks = {i: (runs[i].capture, prepared[i][4], prepared[i][3]) for i in members}
        eng = _SimEngine(cfg, checkpoint=checkpoint, hooks=hooks)
        for i in members:
            engines[i] = eng
    lanes = [
        _Lane(prepared[i][0], engines[i], i, r.budget, r.interval, r.record, r.request)
        for i, r in enumerate(runs)
    ]
    losses = run_packed(model, lanes)
    shape = ModelShape.of(model)
    out = []
    for i, (r, (ce, ent)) in enumerate(zip(runs, losses)):
        eng = engines[i]
        evictions, kept = 0, []
        if i in eng.keys():
            evictions = eng.evictions(i)
            kept = [eng.kept_positions(i, layer, shape.num_kv_heads) for layer in range(shape.num_layers)]
        out.append(SimResult(ce, ent, r.prompt_len, r.policy, r.budget, r.interval, evictions, kept))
    return out


def run_chunked(
    model: Any,
    ids: torch.Tensor,
    engine: EvictionEngine,
    budget: int,
    interval: int,
    *,
    record: Optional[
        List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    ] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chunked forward of ``ids`` with every attention through ``engine.attend`` over a paged
    cache of block size 1 (request key 0); returns per-token ``(ce, entropy)``, ``[T - 1]`` each."""
    return run_packed(model, [_Lane(ids, engine, 0, budget, interval, record)])[0]


#: Tokens whose logits are computed at once (a ``[rows, vocab]`` float32 block).
_LOGIT_ROWS = 512


def _decoder_and_head(model: Any) -> Tuple[Any, Any]:
    """The model's decoder stack (ending in its final norm) and its output projection, so that the
    packed forward computes logits only in blocks of ``_LOGIT_ROWS`` tokens; ``(None, None)`` for a
    model that does not expose them (its whole forward is used)."""
    get_dec = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    dec, head = get_dec(), get_head()
    if dec is None or head is None or dec is model:
        return None, None
    return dec, head


def run_packed(model: Any, lanes: Sequence[_Lane]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The chunked forward of every lane at once: each step the model gets every unfinished lane's
    next chunk (its ``[0, budget)`` first, then ``interval`` tokens at a time), concatenated, with
    their own positions; each engine attends over its lanes' paged caches (block size 1, a slot range
    per lane) and evicts. Returns each lane's per-token ``(ce, entropy)``, ``[T - 1]`` each."""
    shape = ModelShape.of(model)
    dtype = next(model.parameters()).dtype
    dev = model_device(model)  # caches, tables and the forward's inputs live with the weights
    # Per engine: its lanes (in batch order), one cache per layer holding every lane's slot range.
    by_engine: Dict[int, List[int]] = {}
    for i, ln in enumerate(lanes):
        by_engine.setdefault(id(ln.engine), []).append(i)
    offsets, tables, caches = {}, {}, {}
    for eid, members in by_engine.items():
        total, width = 0, max(lanes[i].ids.numel() for i in members)
        rows = []
        for i in members:
            n = lanes[i].ids.numel()
            offsets[i] = total
            row = torch.zeros(width, dtype=torch.int32, device=dev)
            row[:n] = torch.arange(total, total + n, dtype=torch.int32, device=dev)
            rows.append(row)
            total += n
        tables[eid] = dict(zip(members, rows))
        caches[eid] = [
            (
                torch.zeros((total, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=dev),
                torch.zeros((total, 1, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=dev),
            )
            for _ in range(shape.num_layers)
        ]
    for ln in lanes:
        if ln.record is not None:
            ln.record.clear()
            ln.record.extend([] for _ in range(shape.num_layers))
    schedules = [chunks(ln.ids.numel(), ln.budget, ln.interval) for ln in lanes]
    ce = [torch.zeros(ln.ids.numel() - 1, dtype=torch.float32, device=dev) for ln in lanes]
    ent = [torch.zeros(ln.ids.numel() - 1, dtype=torch.float32, device=dev) for ln in lanes]
    targets = [ln.ids.to(dev) for ln in lanes]
    dec, head = _decoder_and_head(model)
    step = 0
    while True:
        # this step's chunks, grouped by engine (each engine's tokens contiguous)
        groups = []
        pos = 0
        for eid, members in by_engine.items():
            active = [i for i in members if step < len(schedules[i])]
            if not active:
                continue
            reqs, slots, spans = [], [], []
            for i in active:
                s, e = schedules[i][step]
                ln = lanes[i]
                reqs.append(StepRequest(key=ln.key, seq_len=e, num_new=e - s, prefill=s == 0, rng_key=ln.rng_key))
                slots.append(torch.arange(offsets[i] + s, offsets[i] + e, dtype=torch.int64, device=dev))
                spans.append((i, s, e, pos))
                pos += e - s
            eng = lanes[active[0]].engine
            plan = eng.begin_step(reqs)
            table = torch.stack([tables[eid][i] for i in active])
            groups.append((eng, plan, table, torch.cat(slots), caches[eid], spans, spans[0][3], pos))
        if not groups:
            break
        ids = torch.cat([targets[i][s:e] for g in groups for (i, s, e, _) in g[5]])
        positions = torch.cat([torch.arange(s, e, device=dev) for g in groups for (_, s, e, _) in g[5]])

        def attend(module, q, k, v, scale, groups=groups):
            layer = layer_index(module)
            q = q.contiguous()
            out = torch.empty_like(q)
            for eng, plan, table, slots, cache, spans, a, b in groups:
                kc, vc = cache[layer]
                kernels.reshape_and_cache(k[a:b].contiguous(), v[a:b].contiguous(), kc, vc, slots)
                eng.attend(plan, layer, q[a:b], kc, vc, table, out[a:b], scale=scale)
                for i, s, e, p in spans:
                    rec = lanes[i].record
                    if rec is not None:
                        rec[layer].append(tuple(x[p : p + e - s].to("cpu", copy=True) for x in (q, k, v)))
            return out

        with routed_attention(model, attend), torch.inference_mode():
            kwargs = dict(input_ids=ids.view(1, -1), position_ids=positions.view(1, -1), use_cache=False)
            if dec is not None:
                hidden = dec(**kwargs).last_hidden_state[0]
                logits = None
            else:
                logits = model(**kwargs).logits[0]
            for g in groups:
                for i, s, e, p in g[5]:
                    t = lanes[i].ids.numel()
                    hi = min(e, t - 1)
                    tgt = targets[i]
                    for c in range(s, hi, _LOGIT_ROWS):
                        c_hi = min(c + _LOGIT_ROWS, hi)
                        rows = slice(p + c - s, p + c_hi - s)
                        lg = head(hidden[rows]) if logits is None else logits[rows]
                        lp = torch.log_softmax(lg.float(), dim=-1)
                        ce[i][c:c_hi] = -lp.gather(1, tgt[c + 1 : c_hi + 1].view(-1, 1)).squeeze(1)
                        ent[i][c:c_hi] = -(lp.exp() * lp).sum(-1)
        step += 1
    return [(c.cpu(), e.cpu()) for c, e in zip(ce, ent)]


def record_full(
    model: Any, input_ids: Any, *, budget: Optional[int] = None, interval: int = 1
) -> Tuple[Trace, SimResult]:
    """The full-cache pass of ``input_ids`` (one forward, or chunked like ``simulate`` when
    ``budget`` is given, which changes full attention only by float rounding) and the
    ``foresightkv.Trace`` of its post-RoPE queries, keys and values, for Golden Eviction and the
    fidelity replay."""
    return record_full_many(model, [input_ids], budget=budget, interval=interval)[0]


def record_full_many(
    model: Any, sequences: Sequence[Any], *, budget: Optional[int] = None, interval: int = 1
) -> List[Tuple[Trace, SimResult]]:
    """``record_full`` of every sequence, in one packed forward per chunk."""
    from safetensors.torch import save_file

    runs, recs = [], []
    for input_ids in sequences:
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
        rec: List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        b = ids.numel() if budget is None else max(budget, 1)
        runs.append(SimRun(ids, 0, "full", b, max(interval, 1), record=rec))
        recs.append(rec)
    results = simulate_many(model, runs)
    out = []
    for rec, res in zip(recs, results):
        tensors = {}
        for layer, parts in enumerate(rec):
            for i, name in enumerate(("queries", "keys", "values")):
                tensors[f"layers.{layer}.{name}"] = torch.cat([p[i] for p in parts]).float().contiguous()
        rec.clear()
        fd, path = tempfile.mkstemp(prefix="fkv-trace-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, path)
            del tensors
            trace = Trace.load(path)
        finally:
            os.unlink(path)
        out.append((trace, res))
    return out
