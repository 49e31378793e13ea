"""``foresightkv train``: traces -> labels -> supervised -> RL -> scorer -> eval, each stage's output
cached under the work directory so that a rerun skips what is done (labels per file, each stage as a
whole once its outputs exist).

Work directory layout:

- ``traces/{train,heldout}.safetensors`` when no ``--traces`` is given (the testbed's trace builder),
- ``labels/{index:05d}_b{budget}.safetensors`` (``labels.py``), one per (train trace, budget),
- ``sl/state.pt`` + ``sl/history.json`` + ``sl/scorer/`` (the supervised scorer as a checkpoint),
- ``rl/state.pt`` + ``rl/history.json`` + ``rl/scorer/``,
- ``eval.json``; ``run.json`` (the arguments of the last run) and ``timings.json`` (seconds per stage).

``--init-scorer DIR`` starts RL from an existing supervised scorer (labels and SL are skipped).
The final scorer (RL when ``--rl-steps > 0``, else supervised) is copied to ``--out`` with a
``training.json`` recording the command, seed, data and stage costs."""

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, Error
from .labels import LabelSet, read_meta, write_labels
from .rl import RlConfig, train_rl
from .rl import save_history as save_rl
from .scorer import TorchScorer
from .supervised import SupervisedConfig, train_supervised
from .supervised import save_history as save_sl


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def _save_state(path: Path, scorer: TorchScorer) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"shape": scorer.shape, "state": scorer.state_dict()}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, device) -> TorchScorer:
    blob = torch.load(path, map_location="cpu")
    s = TorchScorer(*blob["shape"])
    s.load_state_dict(blob["state"])
    return s.to(device)


class Pipeline:
    """One training run (see the module docstring); ``run()`` executes the missing stages."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.work = Path(args.work or (str(args.out).rstrip("/") + ".work"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.budgets: List[int] = [int(b) for b in str(args.budgets).split(",") if b]
        self.timings: Dict[str, float] = {}
        tp = self.work / "timings.json"
        if tp.exists():
            self.timings = json.loads(tp.read_text())
        self._model = None

    # ----------------------------------------------------------------- helpers
    def model(self):
        """The LLM (loaded once, frozen)."""
        if self._model is None:
            from ..testbed.model import load_model

            self._model, self._tok = load_model(
                str(self.args.model), threads=self.args.threads, dtype=getattr(torch, self.args.dtype), device=self.args.device
            )
        return self._model

    def _timed(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=2))

    def shape(self):
        from ..testbed.model import ModelShape

        return ModelShape.of(self.model())

    def sequence(self, traces, i: int):
        """Train sequence ``i``, cut to its first ``--max-len`` tokens when set (a prefix of a
        teacher-forced sequence is one too; the answer may be cut off, which the training losses do
        not need)."""
        seq = traces.sequence(i)
        n = self.args.max_len
        if n and len(seq) > n:
            seq.input_ids, seq.ce, seq.entropy = seq.input_ids[:n], seq.ce[:n], seq.entropy[:n]
            seq.prompt_len = min(seq.prompt_len, n)
        return seq

    # ----------------------------------------------------------------- stages
    def traces(self):
        """The train split (``--traces``, or built into the work directory) and the held-out split
        path for the final eval (or None)."""
        from ..testbed.traces import load_split

        a = self.args
        if a.traces:
            p = Path(a.traces)
            train = p / "train.safetensors" if p.is_dir() else p
            held = Path(a.eval_traces) if a.eval_traces else (train.parent / "heldout.safetensors")
            return load_split(str(train)), (held if held.exists() else None)
        tdir = self.work / "traces"
        train, held = tdir / "train.safetensors", tdir / "heldout.safetensors"
        if not train.exists():
            from ..testbed.traces import write_traces

            t0 = time.time()
            _log(f"building traces into {tdir} ({a.num_traces} train, {a.num_heldout} held out, {a.trace_tokens} tokens)")
            self.model()
            write_traces(
                self._model, self._tok, str(a.model), str(tdir), train=a.num_traces, heldout=a.num_heldout, text=0,
                tokens=a.trace_tokens, progress=not a.quiet,
            )
            self._timed("traces", time.time() - t0)
        return load_split(str(train)), (held if held.exists() else None)

    def labels(self, train) -> List[Path]:
        """One label file per (train trace, budget); existing files are kept."""
        from tqdm import tqdm

        from .episodes import LabelJob, golden_labels_many

        a = self.args
        ldir = self.work / "labels"
        n = min(len(train), a.max_traces) if a.max_traces else len(train)
        jobs = [(i, b) for i in range(n) for b in self.budgets]
        paths = [ldir / f"{i:05d}_b{b}.safetensors" for i, b in jobs]
        todo = [(j, p) for j, p in zip(jobs, paths) if not p.exists()]
        if todo:
            t0 = time.time()
            bar = tqdm(total=len(todo), desc="labels", disable=a.quiet)
            for c in range(0, len(todo), a.batch):
                chunk = todo[c : c + a.batch]
                jobs = []
                for (i, b), _ in chunk:
                    seq = self.sequence(train, i)
                    jobs.append(LabelJob(seq.input_ids, seq.prompt_len, b, a.seed * 1_000_003 + i * 31 + b))
                for ((i, b), p), ev in zip(chunk, golden_labels_many(self.model(), jobs, interval=a.interval, keep=a.label_evictions)):
                    write_labels(p, ev, {"trace": str(i), "budget": str(b), "interval": str(a.interval)})
                bar.update(len(chunk))
            bar.close()
            self._timed("labels", time.time() - t0)
        return paths

    def split_labels(self, paths: Sequence[Path]):
        """Train / validation label sets: the validation traces are the last ``--val-fraction`` of
        the train split's traces (by index), never the held-out split."""
        traces = sorted({read_meta(p)["trace"] for p in paths}, key=int)
        nval = max(1, round(len(traces) * self.args.val_fraction)) if len(traces) > 1 else 0
        val = set(traces[len(traces) - nval :])
        tr = [p for p in paths if read_meta(p)["trace"] not in val]
        va = [p for p in paths if read_meta(p)["trace"] in val]
        return LabelSet(tr), LabelSet(va)

    def supervised(self, paths: Sequence[Path]) -> TorchScorer:
        """The supervised scorer (trained unless ``sl/state.pt`` exists)."""
        a = self.args
        sdir, done = self._resume("sl", "supervised")
        if done is not None:
            return done
        shp = self.shape()
        t0 = time.time()
        train, val = self.split_labels(paths)
        _log(f"supervised: {len(train)} training evictions, {len(val)} validation evictions")
        scorer = TorchScorer(shp.num_layers, shp.num_kv_heads, shp.group, shp.head_dim, seed=a.seed)
        cfg = SupervisedConfig(
            steps=a.sl_steps, lr=a.sl_lr, warmup=a.sl_warmup, evictions_per_step=a.sl_batch, max_pairs=a.max_pairs,
            eval_every=max(1, a.sl_steps // 6), seed=a.seed,
        )
        hist = train_supervised(scorer, train, val, cfg, device=self.device, log=lambda e: _log(f"sl {json.dumps(e)}"), progress=not a.quiet)
        save_sl(sdir / "history.json", cfg, hist)
        self._finish("sl", scorer, t0)
        return scorer

    def reinforce(self, sl: TorchScorer, train) -> TorchScorer:
        """The RL scorer (trained from the supervised one unless ``rl/state.pt`` exists)."""
        from .episodes import RolloutJob, sampled_rollouts

        a = self.args
        rdir, done = self._resume("rl", "RL")
        if done is not None:
            return done
        t0 = time.time()
        n = min(len(train), a.max_traces) if a.max_traces else len(train)
        nval = max(1, round(n * a.val_fraction)) if n > 1 else 0
        usable = [i for i in range(n - nval) if len(self.sequence(train, i)) > min(self.budgets) + a.interval]
        if not usable:
            raise ValueError("no training trace is longer than budget + interval; nothing to evict")
        model = self.model()
        budgets = self.budgets

        def rollout(scorer, items, seed):
            jobs = []
            for k, request in items:
                seq = self.sequence(train, usable[k])
                fits = [b for b in budgets if len(seq) > b + a.interval] or [min(budgets)]
                b = fits[(request // a.group) % len(fits)]
                jobs.append(RolloutJob(seq.input_ids, seq.prompt_len, seq.ce, seq.entropy, b, request))
            return sampled_rollouts(model, scorer, jobs, interval=a.interval, seed=seed, temperature=a.temperature)

        scorer = TorchScorer(*sl.shape).to(self.device)
        scorer.load_state_dict(sl.state_dict())
        cfg = RlConfig(
            steps=a.rl_steps, group=a.group, traces_per_step=a.rl_traces, lr=a.rl_lr, ppo_epochs=a.ppo_epochs,
            temperature=a.temperature, seed=a.seed, kl_start=a.kl_start, kl_anneal_fraction=a.kl_anneal_fraction,
        )
        hist = train_rl(scorer, len(usable), rollout, cfg, device=self.device, log=lambda e: _log(f"rl {json.dumps(e)}"), progress=not a.quiet)
        save_rl(rdir / "history.json", cfg, hist)
        self._finish("rl", scorer, t0)
        return scorer

    def initial_scorer(self, path: Path, train) -> TorchScorer:
        """The supervised scorer RL starts from when ``--init-scorer`` gives one (a scorer checkpoint
        directory, checked against the model), instead of the labels and SL stages. A checkpoint holds
        the plain MLP (standardisation folded in), so the scorer is re-standardised, its scores
        unchanged, with the candidates' feature statistics along its own trajectory on a training
        trace (``feature_normalizer``): RL then updates in standardised units, as after SL."""
        from .._native import ScorerCheckpoint

        try:
            ck = ScorerCheckpoint.load(str(path))
            shp = self.shape()
            ck.check_model(shp.num_layers, shp.num_kv_heads, shp.group, shp.head_dim)
        except Error as e:
            raise ConfigError(f"--init-scorer {path}: {e}") from e
        scorer = TorchScorer.from_checkpoint(ck)
        mean, std = self.feature_normalizer(path, train)
        scorer.restandardize(mean, std)
        _log(f"RL starts from the scorer in {path} (labels and SL skipped)")
        return scorer.to(self.device)

    def feature_normalizer(self, path: Path, train) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-(layer, KV head, feature) mean and std ``[layers, H, in]`` of the candidates' features at
        every eviction of the scorer in ``path`` (deterministic) on the first training trace longer
        than the smallest budget plus the interval, at that budget."""
        from ..testbed.simulate import simulate
        from .scorer import features, in_dim_of

        a, shp, b = self.args, self.shape(), min(self.budgets)
        seq = next((q for q in (self.sequence(train, i) for i in range(len(train))) if len(q) > b + a.interval), None)
        if seq is None:
            raise ValueError(f"no training trace is longer than budget {b} + interval {a.interval}; nothing to evict")
        dims = (shp.num_layers, shp.num_kv_heads, in_dim_of(shp.head_dim, shp.group))
        s1, s2 = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dtype=torch.float64)
        n = torch.zeros(shp.num_layers, dtype=torch.float64)

        def capture(ev) -> None:
            x = features(ev.keys, ev.values, ev.stats).double().cpu()
            s1[ev.layer] += x.sum(1)
            s2[ev.layer] += x.square().sum(1)
            n[ev.layer] += x.shape[1]

        simulate(self.model(), seq.input_ids, prompt_len=seq.prompt_len, policy="foresight", scorer=str(path),
                 budget=b, interval=a.interval, seed=a.seed, capture=capture)
        if bool((n == 0).any()):
            raise ValueError("the scorer's trajectory evicted nothing in some layer; cannot standardise its inputs")
        mean = s1 / n.view(-1, 1, 1)
        std = (s2 / n.view(-1, 1, 1) - mean.square()).clamp(min=0).sqrt()
        return mean.float(), std.float()

    def _resume(self, stage: str, label: str) -> Tuple[Path, Optional[TorchScorer]]:
        """A training stage's directory (made) and, when the stage is done, the scorer it saved
        (``<stage>/state.pt``; None when it still has to run)."""
        d = self.work / stage
        state = d / "state.pt"
        if state.exists():
            _log(f"{label} stage done ({state}); skipping")
            return d, _load_state(state, self.device)
        d.mkdir(parents=True, exist_ok=True)
        return d, None

    def _finish(self, stage: str, scorer: TorchScorer, t0: float) -> None:
        """Saves a trained stage: its exported scorer, the state a rerun resumes from, its time."""
        d = self.work / stage
        self._export(scorer, d / "scorer", stage=stage)
        _save_state(d / "state.pt", scorer)
        self._timed(stage, time.time() - t0)

    def _export(self, scorer: TorchScorer, path: Path, *, stage: str) -> None:
        a = self.args
        scorer.save(
            path,
            budget=self.budgets[len(self.budgets) // 2],
            interval=a.interval,
            extra={"stage": stage, "budgets": self.budgets, "interval": a.interval, "seed": a.seed, "model": str(a.model)},
        )

    def evaluate(self, heldout: Optional[Path]) -> Optional[Dict]:
        """The harness's loss ratio of the supervised and final scorers (and H2O) on up to
        ``--eval-count`` held-out sequences, at every budget."""
        from ..testbed.traces import load_split
        from .evaluate import loss_ratios

        a = self.args
        out = self.work / "eval.json"
        if out.exists():
            return json.loads(out.read_text())
        if heldout is None:
            _log("no held-out split: skipping the eval")
            return None
        t0 = time.time()
        scorers = {"foresight-sl": Path(a.init_scorer) if a.init_scorer else self.work / "sl" / "scorer"}
        if (self.work / "rl" / "scorer").exists():
            scorers["foresight-sl+rl"] = self.work / "rl" / "scorer"
        self.model()
        res = loss_ratios(
            self._model, self._tok, load_split(str(heldout)), scorers, self.budgets, a.interval, limit=a.eval_count,
            progress=not a.quiet, batch=a.batch,
        )
        out.write_text(json.dumps(res, indent=2))
        self._timed("eval", time.time() - t0)
        return res

    def run(self) -> Dict:
        """All stages; returns a summary."""
        a = self.args
        (self.work / "run.json").write_text(json.dumps({k: str(v) for k, v in vars(a).items() if k != "func"}, indent=2))
        if not a.kl_start >= 0 or not 0 <= a.kl_anneal_fraction <= 1:
            raise ConfigError(
                f"--kl-start {a.kl_start} must be >= 0 and --kl-anneal-fraction {a.kl_anneal_fraction} in [0, 1]"
            )
        train, heldout = self.traces()
        if a.init_scorer:
            if a.rl_steps <= 0:
                raise ConfigError(f"--init-scorer {a.init_scorer} starts the RL stage: give --rl-steps > 0 (got {a.rl_steps})")
            sl, paths = self.initial_scorer(Path(a.init_scorer), train), []
        else:
            paths = self.labels(train)
            sl = self.supervised(paths)
        final_dir = self.work / "sl" / "scorer"
        if a.rl_steps > 0:
            self.reinforce(sl, train)
            final_dir = self.work / "rl" / "scorer"
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "scorer.safetensors"):
            shutil.copyfile(final_dir / f, out / f)
        info = json.loads((final_dir / "training.json").read_text())
        info.update(
            {
                "command": " ".join(["foresightkv", "train"] + sys.argv[2:]) if sys.argv[1:2] == ["train"] else " ".join(sys.argv),
                "timings_seconds": self.timings,
                "label_files": len(paths),
                "args": {k: str(v) for k, v in vars(a).items() if k != "func"},
            }
        )
        for stage in ("sl", "rl"):
            h = self.work / stage / "history.json"
            if h.exists():
                info[f"{stage}_last"] = json.loads(h.read_text())["log"][-1]
        from .._native import ScorerCheckpoint

        ck = ScorerCheckpoint.load(str(out))
        shp = self.shape()
        ck.check_model(shp.num_layers, shp.num_kv_heads, shp.group, shp.head_dim)
        ev = self.evaluate(heldout)
        if ev is not None:
            info["eval"] = ev
        (out / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        _log(f"scorer written to {out}; stage seconds {json.dumps(self.timings)}")
        return info


def add_arguments(p) -> None:
    """The ``train`` subcommand's arguments."""
    p.add_argument("--model", required=True, help="HF model directory (Llama / Qwen2 / Qwen3)")
    p.add_argument("--out", required=True, help="directory of the scorer checkpoint to write")
    p.add_argument("--traces", default=None, help="train split file (or a directory holding train.safetensors); built when omitted")
    p.add_argument("--eval-traces", default=None, help="held-out split for the final eval (default: heldout.safetensors beside --traces)")
    p.add_argument("--work", default=None, help="work directory for cached stage outputs (default: OUT.work)")
    p.add_argument("--budgets", default="128,256", help="comma-separated budgets B to train on (one scorer for all)")
    p.add_argument("--interval", type=int, default=32, help="eviction interval L")
    p.add_argument("--device", default="cpu", help="torch device of the model's simulator runs and the scorer training (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--num-traces", type=int, default=32, help="train traces to build when --traces is omitted")
    p.add_argument("--num-heldout", type=int, default=8, help="held-out traces to build when --traces is omitted")
    p.add_argument("--trace-tokens", type=int, default=1536, help="prompt length of built traces")
    p.add_argument("--max-traces", type=int, default=None, help="use only the first N train traces")
    p.add_argument("--max-len", type=int, default=None, help="cut train sequences to their first N tokens (labels and RL)")
    p.add_argument("--label-evictions", type=int, default=6, help="evictions kept per (trace, budget) for SL (all: 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="train traces held back to validate SL")
    p.add_argument("--sl-steps", type=int, default=300)
    p.add_argument("--sl-lr", type=float, default=1e-2)
    p.add_argument("--sl-warmup", type=int, default=10)
    p.add_argument("--sl-batch", type=int, default=8, help="evictions (each: every layer and KV head) per SL step")
    p.add_argument("--max-pairs", type=int, default=16384, help="pairs sampled per row when N^2 exceeds it")
    p.add_argument(
        "--init-scorer", default=None,
        help="scorer checkpoint directory to start RL from (a supervised scorer of this model): skips labels and SL",
    )
    p.add_argument("--rl-steps", type=int, default=10)
    p.add_argument("--rl-traces", type=int, default=2, help="traces per RL step")
    p.add_argument("--group", type=int, default=4, help="sampled trajectories per trace (GRPO group)")
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--kl-start", type=float, default=0.05, help="weight of the KL to the supervised scorer at the first RL step")
    p.add_argument(
        "--kl-anneal-fraction", type=float, default=0.4,
        help="fraction of the RL steps over which the KL weight falls linearly to 0 (the paper: 0.4)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampler softmax temperature")
    p.add_argument("--eval-count", type=int, default=8, help="held-out sequences in the final eval")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--batch", type=int, default=4, help="sequences simulated together (one packed forward) for labels and eval")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="the LLM's weights and KV cache dtype in the simulator (bfloat16: ~2x faster on CPUs with AMX/AVX512-BF16)",
    )


def main(args: Any) -> int:
    """Entry point of ``foresightkv train``."""
    if args.label_evictions == 0:
        args.label_evictions = None
    Pipeline(args).run()
    return 0
