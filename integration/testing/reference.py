"""A dense reference of ForesightKV eviction for one request, independent of any engine and of the
plugins' slot and block plumbing (shared by the SGLang and vLLM plugin tests, which both must match
it): the full K/V history stays in dense tensors, each (layer, KV head) keeps the list of original
positions it holds, attention is a dense softmax over those, and at each eviction the
statistics come from foresightkv's Rust-core ``window_stats`` over a contiguous copy, the victims from
``Policy.choose_victims``.

Protect mode: the prompt (rounded up to a block) is kept whole and read by every query; the kept
lists, statistics and queries of the policy cover the positions after it only."""

from typing import List, Optional

import torch

import foresightkv


class LayerRef:
    """Kept positions and statistics of one (request, layer)."""

    def __init__(self, h: int, group: int) -> None:
        self.kept: List[List[int]] = [[] for _ in range(h)]
        self.stats = torch.zeros((h, 0, group, 8), dtype=torch.float32)
        self.queries: List[torch.Tensor] = []
        self.evictions = 0


class RequestRef:
    """One request's reference state: its stream, length, live start and per-layer state."""

    def __init__(
        self,
        stream,
        serial: int,
        *,
        budget: int,
        interval: int,
        policy,
        num_layers: int,
        hq: int,
        h: int,
        scale: float,
        block_size: int = 1,
        protect_prompt: bool = False,
        prompt_len: Optional[int] = None,
    ):
        self.stream, self.serial, self.block_size = stream, serial, block_size
        self.budget, self.interval, self.policy = budget, interval, policy
        self.hq, self.h, self.g, self.scale = hq, h, hq // h, scale
        self.length = 0
        self.live_start = 0
        self.protect = protect_prompt
        self.protected_len = 0
        #: Length of the whole prompt when the engine gives it: no eviction is due before it is in,
        #: and the step that completes it compresses it once, however it was chunked.
        self.prompt_len = prompt_len
        self.layers = [LayerRef(h, self.g) for _ in range(num_layers)]

    def _due(self, new: int, prefill: bool) -> Optional[int]:
        """DESIGN.md's schedule: the window reached B + L, or a prompt chunk left more than B live; the
        new start is the block-aligned position leaving at least B (exactly B at page size 1). In
        protect mode the window starts after the protected prompt and a prompt is never compressed."""
        base = max(self.live_start, self.protected_len)
        live = self.length - base
        target = (self.length - self.budget) // self.block_size * self.block_size
        p = self.prompt_len
        if p is not None and self.length < p:
            return None
        if p is not None:
            ends_prompt = self.length - new < p <= self.length
        else:
            ends_prompt = prefill and new > 1
        compress = not self.protect and ends_prompt and live > self.budget
        if live > 0 and (live >= self.budget + self.interval or compress) and target > base:
            return target
        return None

    def step(self, new: int, prefill: bool) -> List[torch.Tensor]:
        """Adds ``new`` tokens; returns each layer's attention output ``[new, Hq, D]`` (float32)."""
        p0 = self.length
        self.length += new
        if self.protect and prefill:
            prompt = self.length if self.prompt_len is None else min(self.length, self.prompt_len)
            self.protected_len = max(self.protected_len, -(-prompt // self.block_size) * self.block_size)
        first = min(max(p0, self.protected_len), self.length)
        target = self._due(new, prefill)
        outs = []
        for li, lr in enumerate(self.layers):
            for kh in range(self.h):
                lr.kept[kh].extend(range(first, self.length))
            lr.stats = torch.cat([lr.stats, torch.zeros((self.h, self.length - first, self.g, 8))], dim=1)
            q = self.stream.q[li, p0 : self.length].float()
            k_hist = self.stream.k[li].float()
            v_hist = self.stream.v[li].float()
            out = torch.zeros((new, self.hq, q.shape[-1]))
            for j in range(new):
                pos = p0 + j
                for hh in range(self.hq):
                    kh = hh // self.g
                    prompt = list(range(min(self.protected_len, pos + 1)))
                    idx = torch.tensor(prompt + [p for p in lr.kept[kh] if p <= pos])
                    att = torch.softmax((k_hist[idx, kh] @ q[j, hh]) * self.scale, dim=0)
                    out[j, hh] = att @ v_hist[idx, kh]
            outs.append(out)
            if self.policy.evicts and first < self.length:
                lr.queries.append(self.stream.q[li, first : self.length])
                if target is not None:
                    self._evict(li, lr, target - max(self.live_start, self.protected_len))
        if target is not None:
            self.live_start = target
        return outs

    def _evict(self, li: int, lr: LayerRef, num_evict: int) -> None:
        """Statistics (Rust window_stats over a contiguous copy), victims (Policy), then the kept lists."""
        live = len(lr.kept[0])
        k_hist, v_hist = self.stream.k[li], self.stream.v[li]
        d = k_hist.shape[-1]
        kc = torch.empty((live, 1, self.h, d), dtype=k_hist.dtype)
        for kh in range(self.h):
            kc[:, 0, kh] = k_hist[torch.tensor(lr.kept[kh]), kh]
        stats = lr.stats.permute(1, 0, 2, 3).unsqueeze(1).contiguous()
        queries = torch.cat(lr.queries).unsqueeze(0).contiguous()
        foresightkv.window_stats(
            queries,
            torch.tensor([queries.shape[1]], dtype=torch.int32),
            kc,
            torch.arange(live, dtype=torch.int32).unsqueeze(0),
            torch.tensor([live], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32),
            stats,
            scale=self.scale,
            window=self.interval,
            mode=self.policy.stats_mode,
        )
        lr.stats = stats.squeeze(1).permute(1, 0, 2, 3).contiguous()
        q = queries[0].float()
        new_kept, new_stats = [], []
        for kh in range(self.h):
            pos = torch.tensor(lr.kept[kh])
            victims = self.policy.choose_victims(
                k_hist[pos, kh].float().contiguous(),
                v_hist[pos, kh].float().contiguous(),
                lr.stats[kh].contiguous(),
                q[:, kh * self.g : (kh + 1) * self.g].contiguous(),
                lr.kept[kh],
                self.length,
                num_protected=self.interval,
                num_evict=num_evict,
                layer=li,
                kv_head=kh,
                eviction=lr.evictions,
                request=self.serial,
                scale=self.scale,
            )
            gone = set(victims)
            keep = [i for i in range(live) if i not in gone]
            new_kept.append([lr.kept[kh][i] for i in keep])
            new_stats.append(lr.stats[kh, keep])
        lr.kept = new_kept
        lr.stats = torch.stack(new_stats)
        lr.queries = []
        lr.evictions += 1
