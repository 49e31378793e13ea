"""Trace sets: the model's own full-cache greedy answers to seeded long prompts, and windows of
natural text, stored one safetensors file per split.

File format (``<split>.safetensors``), all sequences concatenated, ``n`` sequences, ``N`` tokens:

- ``input_ids`` int32 ``[N]``: prompt then the model's greedy answer, per sequence;
- ``offsets`` int64 ``[n + 1]``: sequence ``i`` is ``[offsets[i], offsets[i + 1])``;
- ``prompt_len`` int32 ``[n]``: tokens of the prompt (the answer starts there; 0 for text);
- ``ce`` float32 ``[N]``: full-cache cross-entropy of each token given the ones before it (nats;
  NaN at each sequence's first token);
- ``entropy`` float32 ``[N]``: entropy of the predictive distribution of that token (same alignment);
- ``correct`` uint8 ``[n]``: the answer graded exactly against the expected one (0 for text).

The safetensors metadata holds ``format`` (``foresightkv-traces-1``), ``split``, ``model`` (the
directory), and ``examples``: a JSON list with, per sequence, ``task``, ``seed``, ``expected`` and
``generated`` (the decoded answer). Seeds: split ``heldout`` uses seeds ``HELDOUT_SEED + i``, split
``train`` seeds ``i``; they never overlap, and nothing that trains may read the held-out file.

``load_split(path)`` returns a ``TraceSet`` with ``sequence(i)`` views."""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .model import model_device, token_losses
from .tasks import TASKS, grade, make_example, natural_text

#: Format tag written into every trace file.
FORMAT = "foresightkv-traces-1"
#: First seed of the held-out split (the train split uses 0, 1, ...).
HELDOUT_SEED = 1_000_000
#: Splits ``traces`` writes.
SPLITS = ("train", "heldout", "text")


@dataclass
class TraceSeq:
    """One sequence of a trace set."""

    input_ids: torch.Tensor
    prompt_len: int
    ce: torch.Tensor
    entropy: torch.Tensor
    correct: bool
    meta: Dict[str, Any]

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class TraceSet:
    """A loaded split."""

    split: str
    model: str
    input_ids: torch.Tensor
    offsets: torch.Tensor
    prompt_len: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor
    examples: List[Dict[str, Any]]

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def sequence(self, i: int) -> TraceSeq:
        """Sequence ``i`` (views into the concatenated tensors)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return TraceSeq(
            self.input_ids[a:b].long(),
            int(self.prompt_len[i]),
            self.ce[a:b],
            self.entropy[a:b],
            bool(self.correct[i]),
            self.examples[i],
        )

    def accuracy(self) -> float:
        """Fraction of task sequences answered correctly (text windows excluded)."""
        tasks = [i for i, e in enumerate(self.examples) if e.get("task") != "text"]
        if not tasks:
            return float("nan")
        return float(sum(int(self.correct[i]) for i in tasks)) / len(tasks)


def save_split(path: str, split: str, model_dir: str, seqs: Sequence[TraceSeq]) -> None:
    """Writes ``seqs`` as one split file (format in the module docstring), atomically."""
    from safetensors.torch import save_file

    lens = [len(s) for s in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
    tensors = {
        "input_ids": torch.cat([s.input_ids for s in seqs]).to(torch.int32),
        "offsets": offsets,
        "prompt_len": torch.tensor([s.prompt_len for s in seqs], dtype=torch.int32),
        "ce": torch.cat([s.ce for s in seqs]).float(),
        "entropy": torch.cat([s.entropy for s in seqs]).float(),
        "correct": torch.tensor([int(s.correct) for s in seqs], dtype=torch.uint8),
    }
    meta = {
        "format": FORMAT,
        "split": split,
        "model": model_dir,
        "examples": json.dumps([s.meta for s in seqs]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_split(path: str) -> TraceSet:
    """Reads a split file, checking its format tag and tensor shapes."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a {FORMAT} file (format {meta.get('format')!r})"
            )
        t = {
            k: f.get_tensor(k)
            for k in ("input_ids", "offsets", "prompt_len", "ce", "entropy", "correct")
        }
    examples = json.loads(meta["examples"])
    n = t["offsets"].numel() - 1
    if (
        len(examples) != n
        or t["prompt_len"].numel() != n
        or int(t["offsets"][-1]) != t["input_ids"].numel()
    ):
        raise ValueError(
            f"{path}: inconsistent sizes ({n} sequences, {len(examples)} examples)"
        )
    return TraceSet(
        meta.get("split", ""), meta.get("model", ""), examples=examples, **t
    )


def _aligned(ce: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    """Per-token arrays aligned with the input (NaN for the first token)."""
    nan = torch.full((1,), float("nan"))
    return torch.cat([nan, ce.float()]), torch.cat([nan, ent.float()])


def generate_greedy(
    model: Any, prompt_ids: torch.Tensor, max_new: int, stop_ids: Sequence[int]
):
    """One full-cache prefill of ``prompt_ids`` then greedy decoding with the model's own KV cache;
    returns ``(answer_ids, logits)``: the answer (stopping after a token in ``stop_ids`` or
    ``max_new`` tokens) and the logits ``[P + A - 1, V]`` that predicted tokens ``1 .. P + A - 1``
    of prompt + answer (prefill rows, then one row per decoding step)."""
    dev = model_device(model)
    with torch.inference_mode():
        out = model(input_ids=prompt_ids.view(1, -1).to(dev), use_cache=True)
        rows = [out.logits[0].float()]
        past = out.past_key_values
        nxt = int(rows[0][-1].argmax())
        answer = []
        for _ in range(max_new):
            answer.append(nxt)
            if nxt in stop_ids or len(answer) == max_new:
                break
            out = model(
                input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True
            )
            past = out.past_key_values
            rows.append(out.logits[0].float())
            nxt = int(rows[-1][-1].argmax())
    return torch.tensor(answer, dtype=torch.long), torch.cat(rows).cpu()


def stop_token_ids(tokenizer: Any) -> List[int]:
    """Tokens that end an answer: EOS and every token whose text holds a newline or a period."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    for tid in range(len(tokenizer)):
        s = tokenizer.decode([tid])
        if "\n" in s or "." in s:
            stops.add(tid)
    return sorted(stops)


def build_task_traces(
    model: Any,
    tokenizer: Any,
    split: str,
    count: int,
    target_tokens: int,
    *,
    tasks: Sequence[str] = TASKS,
    max_new: int = 12,
    progress: bool = True,
    start: int = 0,
    on_sequence: Optional[Any] = None,
    done: Optional[List[TraceSeq]] = None,
) -> List[TraceSeq]:
    """``count`` task sequences of ``split`` (seeds per the module docstring; tasks in rotation):
    prompt, the model's full-cache greedy answer, its full-cache per-token CE and entropy, graded.
    ``done``: sequences already built (resumed: only the rest are built); ``on_sequence(out)`` is
    called after each new one."""
    from tqdm import tqdm

    base = HELDOUT_SEED if split == "heldout" else 0
    stops = stop_token_ids(tokenizer)
    text = natural_text()
    out = list(done) if done else []
    for i in tqdm(range(start + len(out), start + count), desc=f"traces {split}", disable=not progress):
        task = tasks[i % len(tasks)]
        ex = make_example(task, base + i, target_tokens, tokenizer, text=text)
        prompt = torch.tensor(tokenizer(ex.prompt)["input_ids"], dtype=torch.long)
        answer, logits = generate_greedy(model, prompt, max_new, stops)
        ids = torch.cat([prompt, answer])
        # full-cache CE/entropy of every token from the same run (prefill rows + decoding rows)
        ce, ent = token_losses(torch.cat([logits, logits[-1:]]), ids)
        ce, ent = _aligned(ce, ent)
        gen = tokenizer.decode(answer.tolist())
        meta = {"task": task, "seed": base + i, "expected": ex.answer, "generated": gen}
        out.append(TraceSeq(ids, int(prompt.numel()), ce, ent, grade(ex.answer, gen), meta))
        if on_sequence is not None:
            on_sequence(out)
    return out


def build_text_traces(
    model: Any, tokenizer: Any, count: int, length: int, *, progress: bool = True
) -> List[TraceSeq]:
    """Up to ``count`` consecutive ``length``-token windows of the natural text (teacher-forced
    evaluation; no prompt, no answer)."""
    from tqdm import tqdm

    ids = torch.tensor(tokenizer(natural_text())["input_ids"], dtype=torch.long)
    n = min(count, ids.numel() // length)
    out = []
    for i in tqdm(range(n), desc="traces text", disable=not progress):
        w = ids[i * length : (i + 1) * length]
        with torch.inference_mode():
            logits = model(input_ids=w.view(1, -1).to(model_device(model)), use_cache=False).logits[0].cpu()
        ce, ent = _aligned(*token_losses(logits, w))
        meta = {
            "task": "text",
            "seed": i,
            "expected": "",
            "generated": "",
            "source": "/usr/share/common-licenses",
        }
        out.append(TraceSeq(w, 0, ce, ent, False, meta))
    return out


def write_traces(
    model: Any,
    tokenizer: Any,
    model_dir: str,
    out_dir: str,
    *,
    train: int,
    heldout: int,
    text: int,
    tokens: int,
    tasks: Sequence[str] = TASKS,
    max_new: int = 12,
    progress: bool = True,
) -> Dict[str, Optional[float]]:
    """Builds and writes the three splits; returns the full-cache accuracy of each."""
    acc: Dict[str, Optional[float]] = {}
    for split, count in (("heldout", heldout), ("train", train)):
        if count <= 0:
            continue
        path = os.path.join(out_dir, f"{split}.safetensors")
        done = None
        if os.path.isfile(path):
            old = load_split(path)
            if old.examples and all(e.get("task") in tasks for e in old.examples):
                # resume a run that stopped part way (the same seeds give the same sequences)
                done = [old.sequence(i) for i in range(min(len(old), count))]
        seqs = build_task_traces(
            model,
            tokenizer,
            split,
            count,
            tokens,
            tasks=tasks,
            max_new=max_new,
            progress=progress,
            # rewritten after every sequence: a long run can be read (and stopped) part way
            on_sequence=lambda out, path=path, split=split: save_split(path, split, model_dir, out),
            done=done,
        )
        save_split(
            os.path.join(out_dir, f"{split}.safetensors"), split, model_dir, seqs
        )
        acc[split] = sum(s.correct for s in seqs) / len(seqs)
    if text > 0:
        seqs = build_text_traces(model, tokenizer, text, tokens, progress=progress)
        if seqs:
            save_split(
                os.path.join(out_dir, "text.safetensors"), "text", model_dir, seqs
            )
        acc["text"] = None
    return acc
