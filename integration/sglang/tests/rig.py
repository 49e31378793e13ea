"""A CPU test rig of real SGLang 0.5.23 parts: ReqToTokenPool, MHATokenToKVPool, TokenToKVPoolAllocator,
a disabled UnifiedRadixCache (the release path), Req objects, ForwardBatch and RadixAttention layers;
it allocates slots the way the scheduler does and drives an attention backend layer by layer with
reproducible per-(request, position, layer) queries, keys and values."""

from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.managers.schedule_batch import Req, release_req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.srt.sampling.sampling_params import SamplingParams

from foresightkv_sglang.hooks import annotate_forward_batch


@dataclass
class Stream:
    """The reproducible inputs of one logical request: per layer, q/k/v of every position."""

    q: torch.Tensor  # [layers, max_len, Hq, D]
    k: torch.Tensor  # [layers, max_len, H, D]
    v: torch.Tensor


@dataclass
class Live:
    """A request the rig is running: the SGLang Req, its stream and its current length."""

    name: str
    req: Req
    stream: Stream
    length: int = 0
    history: List[int] = field(default_factory=list)


class Rig:
    """Real SGLang pools and release path on CPU plus a batch driver."""

    def __init__(
        self, server_args, *, size=512, rows=8, max_ctx=256, hq=4, h=2, d=64, layers=2, dtype=torch.float32, seed=0
    ):
        self.size, self.hq, self.h, self.d, self.num_layers, self.dtype = size, hq, h, d, layers, dtype
        self.max_ctx = max_ctx
        self.rtp = ReqToTokenPool(rows, max_ctx, device="cpu", enable_memory_saver=False)
        self.kv = MHATokenToKVPool(
            size,
            page_size=1,
            dtype=dtype,
            head_num=h,
            head_dim=d,
            layer_num=layers,
            device="cpu",
            enable_memory_saver=False,
        )
        self.alloc = TokenToKVPoolAllocator(size, dtype, "cpu", self.kv, need_sort=False)
        params = CacheInitParams(
            disable=True, req_to_token_pool=self.rtp, token_to_kv_pool_allocator=self.alloc, page_size=1
        )
        params.tree_components = (ComponentType.FULL,)
        self.tree = UnifiedRadixCache(params)
        self.runner = SimpleNamespace(
            device="cpu",
            page_size=1,
            req_to_token_pool=self.rtp,
            token_to_kv_pool=self.kv,
            token_to_kv_pool_allocator=self.alloc,
            server_args=server_args,
        )
        self.scale = d**-0.5
        self.layers = [RadixAttention(hq, d, self.scale, h, i) for i in range(layers)]
        self.gen = torch.Generator().manual_seed(seed)
        self.streams: Dict[str, Stream] = {}

    def stream(self, name: str) -> Stream:
        """The inputs of logical request ``name`` (created on first use, reused after a retraction)."""
        if name not in self.streams:
            shape = (self.num_layers, self.max_ctx)
            g = self.gen
            self.streams[name] = Stream(
                torch.randn(*shape, self.hq, self.d, generator=g, dtype=torch.float32).to(self.dtype),
                torch.randn(*shape, self.h, self.d, generator=g, dtype=torch.float32).to(self.dtype),
                torch.randn(*shape, self.h, self.d, generator=g, dtype=torch.float32).to(self.dtype),
            )
        return self.streams[name]

    def request(self, name: str, prompt: int = 4, *, max_new: int = 4, ignore_eos: bool = False, seed=None) -> Live:
        """A new SGLang request of a ``prompt``-token prompt, not holding a row yet (a waiting request);
        its first batch gives it one, as ``prepare_for_extend`` does."""
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos, sampling_seed=seed)
        req = Req(name, "", array("q", range(prompt)), params)
        return Live(name, req, self.stream(name))

    def add(self, name: str, prompt: int = 4, **kw) -> Live:
        """A new SGLang request of a ``prompt``-token prompt holding a fresh ``req_to_token`` row (no
        slots yet)."""
        live = self.request(name, prompt, **kw)
        assert self.rtp.alloc([live.req]) is not None
        return live

    def _grow(self, live: Live, n: int) -> torch.Tensor:
        """Allocates ``n`` slots for ``live``'s next positions, as the scheduler does (and its
        ``req_to_token`` row first if it has none)."""
        if live.req.kv.req_pool_idx is None:
            assert self.rtp.alloc([live.req]) is not None, "rig rows exhausted"
        locs = self.alloc.alloc(n)
        assert locs is not None, "rig pool exhausted"
        row = live.req.kv.req_pool_idx
        self.rtp.write((row, slice(live.length, live.length + n)), locs.to(torch.int32))
        live.length += n
        live.req.kv.kv_allocated_len = live.length
        live.req.kv.kv_committed_len = live.length
        return locs

    def batch(self, reqs: List[Live], new: List[int]) -> ForwardBatch:
        """A ForwardBatch adding ``new[i]`` tokens to ``reqs[i]`` (EXTEND unless every count is 1 and
        every request already has tokens, then DECODE)."""
        decode = all(n == 1 for n in new) and all(r.length > 0 for r in reqs)
        prefix = [r.length for r in reqs]
        locs = torch.cat([self._grow(r, n) for r, n in zip(reqs, new)])
        seq_lens = torch.tensor([r.length for r in reqs], dtype=torch.int64)
        rows = torch.tensor([r.req.kv.req_pool_idx for r in reqs], dtype=torch.int64)
        kw = dict(
            forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            batch_size=len(reqs),
            input_ids=torch.zeros(int(sum(new)), dtype=torch.int64),
            req_pool_indices=rows,
            seq_lens=seq_lens,
            out_cache_loc=locs,
            seq_lens_sum=int(seq_lens.sum()),
            seq_lens_cpu=seq_lens.clone(),
            req_pool_indices_cpu=rows.clone(),
        )
        if not decode:
            kw.update(
                extend_seq_lens=torch.tensor(new, dtype=torch.int32),
                extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
                extend_seq_lens_cpu=list(new),
                extend_prefix_lens_cpu=list(prefix),
                extend_num_tokens=int(sum(new)),
            )
        fb = ForwardBatch(**kw, rids=[r.req.rid for r in reqs])
        fb.rig_spans = [(r, p, n) for r, p, n in zip(reqs, prefix, new)]
        # what SGLang's ForwardBatch.init_new does with foresightkv's hook (hooks.init_new_hook)
        annotate_forward_batch(fb, [r.req for r in reqs])
        return fb

    def decoded(self, reqs: List[Live]) -> None:
        """Records one generated token for each of ``reqs`` (what the scheduler appends after a
        forward), so SGLang's admission sees their progress."""
        for r in reqs:
            r.req.output_ids.append(0)

    def inputs(self, fb: ForwardBatch, layer: int):
        """q ``[T, Hq*D]``, k, v ``[T, H, D]`` of the batch's new tokens at ``layer``."""
        qs, ks, vs = [], [], []
        for r, p, n in fb.rig_spans:
            qs.append(r.stream.q[layer, p : p + n])
            ks.append(r.stream.k[layer, p : p + n])
            vs.append(r.stream.v[layer, p : p + n])
        q = torch.cat(qs).reshape(-1, self.hq * self.d)
        return q, torch.cat(ks), torch.cat(vs)

    def run(self, backend, fb: ForwardBatch) -> List[torch.Tensor]:
        """One forward as SGLang's runner does it: ``init_forward_metadata``, then each
        ``RadixAttention`` layer called inside a forward context naming ``backend``; returns each
        layer's output ``[T, Hq, D]``."""
        backend.init_forward_metadata(fb)
        outs = []
        with forward_context(ForwardContext(attn_backend=backend)):
            for i, layer in enumerate(self.layers):
                q, k, v = self.inputs(fb, i)
                o = layer(q, k, v, fb)
                outs.append(o.reshape(-1, self.hq, self.d).clone())
        return outs

    def finish(self, live: Live) -> None:
        """Releases a finished request through SGLang's own ``release_kv_cache``."""
        release_kv_cache(live.req, self.tree, checkpoint=False)

    def retract(self, live: Live) -> None:
        """Retracts a running request through SGLang's own ``release_req`` (as the scheduler does)."""
        release_req(
            req=live.req,
            remaing_req_count=0,
            req_to_token_pool=self.rtp,
            token_to_kv_pool_allocator=self.alloc,
            tree_cache=self.tree,
            hisparse_coordinator=None,
        )

    def free_slots(self) -> List[int]:
        """Every slot id on the allocator's free lists, duplicates kept."""
        return [int(x) for x in self.alloc.get_all_free_pages().tolist()]


def tiny_model_config(path, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    """SGLang's ``ModelConfig`` of a tiny Llama (head dim 64) written to directory ``path``."""
    import json
    from pathlib import Path

    from sglang.srt.configs.model_config import ModelConfig

    path = Path(path) / f"llama-{heads}-{kv_heads}-{layers}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64 * heads,
                "intermediate_size": 512,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "head_dim": 64,
                "vocab_size": 1000,
                "max_position_embeddings": 512,
                "torch_dtype": "float32",
            }
        )
    )
    return ModelConfig(str(path))


_MODEL = []


def running_batch(rig: Rig, lives: List[Live]):
    """SGLang's ``ScheduleBatch`` of the running requests ``lives`` (what ``PrefillAdder`` weighs)."""
    import tempfile

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    if not _MODEL:
        _MODEL.append(tiny_model_config(tempfile.mkdtemp(prefix="fkv-rig-")))
    return ScheduleBatch.init_new(
        [lv.req for lv in lives],
        rig.rtp,
        rig.alloc,
        rig.tree,
        _MODEL[0],
        False,
        SpeculativeAlgorithm.NONE,
    )


def admit(rig: Rig, waiting: List[Live], running: List[Live], *, chunk=None, chunked=None, ratio=1.0):
    """One admission round of SGLang's scheduler (``Scheduler._get_new_batch_prefill_raw``): a real
    ``PrefillAdder`` over the rig's tree cache and allocator with ``running`` as the running batch,
    first the in-progress chunked request ``chunked`` (``add_chunked_req``), then ``waiting`` in order
    (``init_next_round_input`` + ``add_one_req``) until one is refused. Returns ``(admitted, extend
    lengths, new chunked request)``: the lives SGLang would prefill now, how many tokens each, and the
    request left mid-prompt (None when every admitted prompt completes)."""
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

    adder = PrefillAdder(1, rig.tree, rig.alloc, running_batch(rig, running), ratio, 1 << 20, chunk)
    by_req = {id(lv.req): lv for lv in waiting + ([chunked] if chunked else [])}
    left = None
    if chunked is not None:
        chunked.req.init_next_round_input()
        left = adder.add_chunked_req(chunked.req)
    for lv in waiting:
        if adder.budget_state() == AddReqResult.OTHER:
            break
        lv.req.init_next_round_input(rig.tree)
        if adder.add_one_req(lv.req, has_chunked_req=chunked is not None, truncation_align_size=None) != (
            AddReqResult.CONTINUE
        ):
            break
    if adder.new_chunked_req is not None:
        left = adder.new_chunked_req
    lives = [by_req[id(r)] for r in adder.can_run_list]
    return lives, [r.extend_end - r.prefix_len for r in adder.can_run_list], (by_req[id(left)] if left else None)


def chunk_done(rig: Rig, lives: List[Live]) -> None:
    """What the scheduler does after a prefill forward: each request resumes after its extend
    (``checkpoint_kv_cache``)."""
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    for lv in lives:
        checkpoint_kv_cache(lv.req, rig.tree)
