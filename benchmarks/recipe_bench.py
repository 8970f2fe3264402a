"""Recipe benchmark (issue 18): our HSTU setup against the official one, difference by
difference, and beyond, with several seeds per row.

A job trains one (dataset, model, recipe, protocol, seed) for the recipe's fixed number of
epochs, validating every epoch, and records the test metrics at the validation-selected epoch
and at the last epoch, each under two seen-item rules (every history item excluded; only the
last 200, as the official evaluation does). Every finished job is one line of
``results/recipe_runs.jsonl``; a job already there is not run again, so a plan can be resumed
after an interruption and run on several machines.

    .venv/bin/python benchmarks/recipe_bench.py run --plan ml1m --device cuda --workers 6   # ~4 min a job on an H200
    .venv/bin/python benchmarks/recipe_bench.py run --plan cpu --workers 2 --threads 1      # everything else, 2 cores
    .venv/bin/python benchmarks/recipe_bench.py list --plan cpu          # the jobs and which are done
    .venv/bin/python benchmarks/recipe_bench.py merge --source other.jsonl   # runs made elsewhere
    .venv/bin/python benchmarks/recipe_bench.py report                   # -> results/recipe_bench.{md,json}
    .venv/bin/python benchmarks/recipe_bench.py reread --only KEY        # read a job's test again from its kept weights

A ``history=lifelong`` job is read on test as it is served, over each user's whole history (as
its validation is); before 2026-12-07 (code 4ed02cf and earlier) its test_selected and
test_ranks_selected were read over the last ``max_len`` events (its test_last was served).

Datasets (read from ``$PERSREC_DATA_DIR``, default ``../shared/data``): ``ml1m`` (the sequence
file, no timestamps), ``ml1m-ts`` (GroupLens ``ratings.dat`` lines of users 1-2,999, with
timestamps) and ``mlsmall`` (ml-latest-small ``ratings.csv``). Models: HSTU and SASRec over the
last 200 items (2 blocks, dim 50, one head), PerSRec with K=8 memory tokens and a recent window
of 50 under both memory policies. Each job's selected weights are kept in ``runs/recipe_bench``
(never committed) for later readings (``lifelong_bench.py``, ``reread``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persrec.models.shapes import shape_named

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "recipe_runs.jsonl"
log = logging.getLogger("recipe_bench")

DATASETS = {
    "ml1m": "ml-1m/ml-1m_sequences_original_ids.txt.gz",
    "ml1m-ts": "ml-1m/ratings_subset_users1-2999.dat.gz",
    "mlsmall": "ml-latest-small/ratings.csv",
}
ITEM_TEXTS = {"ml1m": "ml-1m/movies.dat", "ml1m-ts": "ml-1m/movies.dat", "mlsmall": "ml-latest-small/movies.csv"}
BASE = dict(dim=50, num_layers=2, num_heads=1, head_dim=50, max_len=200, dropout=0.2)
MODELS: dict[str, dict[str, Any]] = {
    "hstu": {},
    # HSTU-large: the official ML-1M large config (8 blocks, 2 heads of 25)
    "hstu-large": (lambda s: dict(num_layers=s.layers, num_heads=s.heads, head_dim=s.head_dim))(shape_named("ml-1m-large")),
    "sasrec": dict(architecture="sasrec"),
    "persrec-recompress-k8": dict(num_memory_tokens=8, recent_len=50, segment_len=50, policy="recompress"),
    "persrec-incremental-k8": dict(num_memory_tokens=8, recent_len=50, segment_len=50, policy="incremental"),
}
# the generated sets: a small model (the planted tastes lie beyond a 40-item window or a recent
# part of 10-19); the plain synthetic set is a 2-epoch smoke test
PLANTED = ("dormant", "recurring", "steady", "taste")  # models.experiment.GENERATED's "synthetic-<name>"
SMALL = {"synthetic": dict(max_len=40, dim=16, head_dim=16), **dict.fromkeys(PLANTED, dict(max_len=40, dim=32, head_dim=32))}
GENERATED = {"synthetic": "synthetic", **{d: f"synthetic-{d}" for d in PLANTED}}
RULES = {"exclude": dict(window=None), "exclude-200": dict(window=200)}


@dataclass(frozen=True)
class Job:
    dataset: str
    model: str
    recipe: str  # a models.recipe expression: "official", "ours+negatives", "best" ...
    protocol: str  # heldout | published
    seed: int
    items: str = "id"  # the item representation (models.items.ItemRepr)
    split: str = "loo"  # loo | cold10 (10% of the items held out of training: models.coldstart)

    @property
    def key(self) -> str:
        extra = "" if (self.items, self.split) == ("id", "loo") else f"/{self.items}/{self.split}"
        return f"{self.dataset}/{self.model}/{self.recipe}/{self.protocol}/s{self.seed}{extra}"


def _jobs(datasets, models, recipes, protocols=("heldout",), seeds=(1, 2, 3)) -> list[Job]:
    return [Job(d, m, r, p, s) for d in datasets for m in models for r in recipes for p in protocols for s in seeds]


SINGLE = ["ours+" + d for d in ("negatives", "optimizer", "batching", "abs_positions", "norm_init",
                                 "bias_init", "attention_norm", "epochs")]
PERSREC = ["persrec-recompress-k8", "persrec-incremental-k8"]
FULL = "official+negatives=full+abs_positions=false"  # a full softmax instead of 128 negatives
LONG_FOLDS = "best+history=lifelong+fold_grad=8"  # the gradient through 8 folds before the window
CARRY = LONG_FOLDS + "+memory_carry=true"  # and each fold starts from the memory before it
ANYWHERE = "best+history=anywhere"  # HSTU: windows ending anywhere, not only each user's last


def plan(name: str) -> list[Job]:
    """Jobs in priority order (a deadline cuts the tail)."""
    plans = {
        # ML-1M's claim rows: ours vs official vs beyond, HSTU vs SASRec (run on an H200)
        "ml1m": (_jobs(["ml1m"], ["hstu"], ["ours", "official", FULL])
                 + _jobs(["ml1m"], ["sasrec"], ["official", FULL])),
        # PerSRec against HSTU with the same recipe, seed by seed (comparable rows at any time)
        "ml1m-persrec": sorted(_jobs(["ml1m"], ["hstu"] + PERSREC, ["best"]), key=lambda j: j.seed),
        # INCREMENTAL trained as served: windows anywhere in a history, the memory carried in
        **{f"{d}-lifelong": _jobs([d], ["persrec-incremental-k8"], ["best+history=lifelong"]) for d in ("ml1m", "mlsmall", "ml1m-ts")},
        # the same with the memory carry (a fold reads the whole chain, not only the last segment)
        **{f"{d}-carry": _jobs([d], ["persrec-incremental-k8"], [CARRY]) for d in ("ml1m", "mlsmall", "ml1m-ts")},
        "ml1m-published": _jobs(["ml1m"], ["hstu"], ["official", "best"], ["published"]),
        # beyond: the official large shape (published ML-1M NDCG@10 .1893); ~4x a job: for a GPU
        "ml1m-large": _jobs(["ml1m"], ["hstu-large"], ["best"]),
        "ml1m-screening": _jobs(["ml1m"], ["hstu"], SINGLE + ["official+num_negatives=512"], seeds=(1,)),
        # the time bias on the timestamped sets: the official recipe with and without it
        **{f"timed-{d}": (_jobs([d], ["hstu"], ["official", "official+time_bias=false", "best"])
                          + _jobs([d], ["sasrec"], ["official"])
                          + _jobs([d], PERSREC, ["best"]))
           for d in ("mlsmall", "ml1m-ts")},
        # the content tower (issue 21): items by id, text, or both; standard and cold-start splits
        **{f"items-{d}": [Job(d, "hstu", "best", "heldout", s, items, split)  # seed-major: comparable at any time
                          for split in ("cold10", "loo") for s in (1, 2, 3) for items in ("id", "text", "id+text")
                          if (items, split) != ("id", "loo")]
           for d in ("mlsmall", "ml1m")},
        # id+text with the id part dropped for half the items in each training step
        **{f"items-dropout-{d}": [Job(d, "hstu", "best+id_dropout=0.5", "heldout", s, "id+text", split)
                                  for split in ("cold10", "loo") for s in (1, 2, 3)]
           for d in ("mlsmall", "ml1m")},
        # id+text with an untrained item's id part predicted from its text (a ridge map); on the
        # standard split every item is trained, so it would equal `best` there: cold10 only
        **{f"items-newids-{d}": [Job(d, "hstu", "best+new_item_ids=text", "heldout", s, "id+text", "cold10")
                                 for s in (1, 2, 3)]
           for d in ("mlsmall", "ml1m")},
        # the controls of the lifelong memory: generated tastes that older events tell
        # (``models.synthetic.dormant_interest_interactions``, ``steady_taste_interactions``), seed-major
        **{d: sorted(_jobs([d], ["hstu"] + PERSREC, ["best"])
                     + _jobs([d], ["persrec-incremental-k8"], ["best+history=lifelong", LONG_FOLDS, CARRY]),
                     key=lambda j: j.seed)
           for d in PLANTED},
        # HSTU trained on max_len windows ending anywhere in a history (drawn each epoch), not
        # only each user's last: the baseline for what lifelong training alone gives PerSRec
        **{f"anywhere-{d}": _jobs([d], ["hstu"], [ANYWHERE]) for d in PLANTED + ("mlsmall", "ml1m-ts", "ml1m")},
        # smoke test: synthetic data, two epochs
        "quick": [Job("synthetic", m, r, "heldout", 1) for m in ("hstu", "persrec-incremental-k8") for r in ("ours", "best")],
    }
    if name == "cpu":  # this order on a 2-core machine: cheapest claims first
        return (plans["timed-mlsmall"] + plans["mlsmall-lifelong"] + plans["ml1m-persrec"] + plans["ml1m-lifelong"] + plans["timed-ml1m-ts"] + plans["ml1m-ts-lifelong"]
                + plans["ml1m-published"] + plans["ml1m-screening"] + plans["items-mlsmall"] + plans["items-dropout-mlsmall"]
                + plans["items-newids-mlsmall"] + plans["items-ml1m"] + plans["items-dropout-ml1m"])
    if name not in plans:
        raise SystemExit(f"unknown plan {name!r}; known: {sorted(plans) + ['cpu']}")
    return plans[name]


# ------------------------------------------------------------------------------------ running
_DATA_CACHE: dict[str, Any] = {}


def load(dataset: str):
    from persrec.models import experiment
    from persrec.models.data import data_dir

    if dataset not in _DATA_CACHE:
        path = GENERATED.get(dataset) or data_dir() / DATASETS[dataset]
        _DATA_CACHE[dataset] = experiment.load_dataset(path)
    return _DATA_CACHE[dataset]


def checkpoint_path(save_dir: Path, key: str) -> Path:
    """Where a job's selected weights are kept (``runs/`` is not committed: weights trained on
    the data sets never are)."""
    return save_dir / (key.replace("/", "__") + ".pt")


def run_job(job: Job, device: str, threads: int | None, epochs: int | None = None,
            save_dir: Path | None = None) -> dict[str, Any]:
    import torch

    from persrec.models import experiment
    from persrec.models.evaluate import Evaluator, SeenRule
    from persrec.models.recipe import recipe_named
    from persrec.testing.machine import code_commit, cpu_model

    if threads:
        torch.set_num_threads(threads)
    data = load(job.dataset)
    recipe = recipe_named(job.recipe)
    spec = MODELS[job.model]
    if spec.get("num_memory_tokens"):
        recipe = recipe.with_(abs_positions=False)  # undefined for memory rows (ModelConfig)
    if spec.get("architecture") == "sasrec":  # SASRec has its own positions and no relative bias
        recipe = recipe.with_(time_bias=False, request_time=False, abs_positions=False)
    small = job.dataset in SMALL
    base = BASE | SMALL.get(job.dataset, {})
    if small and spec.get("num_memory_tokens"):
        spec = spec | dict(recent_len=10, segment_len=10)
    has_ts = data.sequences.timestamps is not None
    overrides = base | spec | recipe.model_overrides(base["max_len"], has_ts)
    text, cold = None, None
    if job.items != "id":
        text = item_text_embeddings(job.dataset, data)
        overrides |= dict(item_repr=job.items, text_dim=text.shape[1])
    if job.split == "cold10":
        from persrec.models.coldstart import hold_out_items

        split, cold = hold_out_items(data.split, data.id_map.num_items, 0.1, seed=job.seed)
        data = dataclasses.replace(data, split=split)
    n_epochs = epochs or (2 if job.dataset == "synthetic" else recipe.epochs)
    # the published protocol has no validation: its test curve is what the official code logs each
    # epoch (recorded, never used to choose: the protocol reports its last epoch)
    test_every = 1 if job.protocol == "published" else n_epochs
    tcfg = recipe.train_config(seed=job.seed, epochs=n_epochs, patience=None, eval_every=1, test_every=test_every)
    rules = {name: SeenRule(**r) for name, r in RULES.items()}
    t0 = time.monotonic()
    def progress(r):
        if r.epoch % 10 == 0:
            v = f" valid NDCG@10 {r.valid['ndcg@10']:.4f}" if r.valid else ""
            print(f"  {job.key} epoch {r.epoch}: {time.monotonic() - t0:.0f}s{v}", flush=True)

    model, fit = experiment.train_on(data, overrides, tcfg, out_dir=None, device=device,
                                     protocol=job.protocol, test_rules=rules, on_epoch=progress, text_embeddings=text,
                                     unknown_items=cold)
    seconds = time.monotonic() - t0
    last = fit.history[-1].test
    selected, ranks = read_test(model, data, recipe, device)
    selected = selected if job.protocol == "heldout" else last
    tester = Evaluator(data.split.test, model.cfg, {"exclude": rules["exclude"]}, device=device)
    if save_dir is not None:  # for later evaluations of the same models (e.g. long histories)
        from persrec.models.checkpoint import make_checkpoint, save_checkpoint

        save_checkpoint(make_checkpoint(model, data.id_map.to_json(), {"job": job.key}), checkpoint_path(save_dir, job.key))
    round4 = lambda m: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}  # noqa: E731
    by_target = {}
    if cold is not None:  # test metrics on rows whose target was held out of training, and the rest
        from persrec.models.metrics import metrics_from_ranks

        is_cold = torch.from_numpy(np.isin(data.split.test.target, cold))

        def cold_share() -> float:  # of the top-10 slots of every test row: how exposed the new items are
            return float(np.isin(tester.top_items(model, 10).numpy(), cold).mean())

        by_target = {"cold": metrics_from_ranks(ranks[is_cold]), "warm": metrics_from_ranks(ranks[~is_cold]),
                     "cold_rows": int(is_cold.sum()), "cold_top10_share": cold_share()}
        if model.cfg.new_item_ids == "text":  # the same weights with the held-out items' id part zero
            from persrec.models.items import forget_items

            forget_items(model.item_emb, cold)
            zero = tester.ranks(model)["exclude"]
            by_target["zero_ids"] = {"cold": metrics_from_ranks(zero[is_cold]), "warm": metrics_from_ranks(zero[~is_cold]),
                                     "all": metrics_from_ranks(zero), "cold_top10_share": cold_share()}
    return dict(
        key=job.key, dataset=job.dataset, model=job.model, recipe=job.recipe, protocol=job.protocol,
        seed=job.seed, items=job.items, split=job.split, test_by_target=by_target,
        recipe_settings=recipe.to_dict(), config=model.cfg.to_dict(),
        epochs=n_epochs, best_epoch=fit.best_epoch if job.protocol == "heldout" else n_epochs,
        train_seconds=round(seconds, 1),
        loss=[round(r.loss, 4) for r in fit.history],
        valid_ndcg10=[round(r.valid["ndcg@10"], 5) for r in fit.history if r.valid],
        test_ndcg10={rule: [round(r.test[rule]["ndcg@10"], 5) for r in fit.history if r.test]
                     for rule in RULES} if test_every == 1 else {},
        test_selected={k: round4(v) for k, v in selected.items()},
        test_last={k: round4(v) for k, v in last.items()},
        test_ranks_selected=ranks.tolist(),
        machine=dict(cpu=cpu_model(), device=device, threads=torch.get_num_threads(),
                     gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None,
                     torch=torch.__version__),
        code=code_commit(),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def read_test(model, data, recipe, device: str):
    """The test metrics under every seen rule and the per-user target ranks (every history item
    excluded), read as the model is served: a ``history=lifelong`` model over its whole history
    (as ``fit`` reads it for validation), any other over its last ``max_len`` events."""
    from persrec.models.evaluate import Evaluator, SeenRule
    from persrec.models.train import History

    rules = {name: SeenRule(**r) for name, r in RULES.items()}
    ev = Evaluator(data.split.test, model.cfg, rules, device=device, lifelong=recipe.history is History.LIFELONG)
    metrics, ranks = ev.metrics_and_ranks(model)
    return metrics, ranks["exclude"]


def item_text_embeddings(dataset: str, data) -> "np.ndarray":
    """The items' text embeddings ``[I, 384]`` (all-MiniLM-L6-v2, cached in runs/text-cache)."""
    from persrec.models.data import data_dir
    from persrec.models.text import MiniLMEncoder, encode_cached, item_texts, movielens_texts

    texts = item_texts(data.id_map, movielens_texts(data_dir() / ITEM_TEXTS[dataset]))
    return encode_cached(texts, MiniLMEncoder(), Path(__file__).resolve().parents[1] / "runs" / "text-cache")


def _worker(args):
    job, device, threads, epochs, save_dir = args
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_job(job, device, threads, epochs, save_dir), None
    except Exception as e:  # a failed job is reported and skipped, the others go on
        import traceback

        return None, f"{job.key}: {type(e).__name__}: {e}\n{traceback.format_exc()}"


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def cmd_run(args) -> int:
    jobs = [j for j in plan(args.plan) if not args.only or any(s in j.key for s in args.only.split(","))]
    done = done_keys(args.out)
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(jobs)} jobs in plan {args.plan!r}, {len(jobs) - len(todo)} done, {len(todo)} to run "
          f"on {args.workers} worker(s), device {args.device}", flush=True)
    if not todo:
        return 0
    t0 = time.monotonic()
    ctx = mp.get_context("spawn")
    failed = 0
    # a killed run stops its workers too (the pool's exit terminates them); they would train on, unseen
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with ctx.Pool(args.workers, maxtasksperchild=None) as pool:
        pending = pool.imap_unordered(_worker, [(j, args.device, args.threads, args.epochs, args.save_dir) for j in todo])
        for _ in todo:
            left = None if args.deadline_s is None else args.deadline_s - (time.monotonic() - t0)
            if left is not None and left <= 0:
                print("deadline reached: stopping", flush=True)
                pool.terminate()
                break
            try:
                result, error = pending.next(timeout=left)
            except mp.TimeoutError:
                print("deadline reached: stopping", flush=True)
                pool.terminate()
                break
            if error:
                failed += 1
                print("FAILED " + error, flush=True)
                continue
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            sel = result["test_selected"]["exclude"]["ndcg@10"]
            print(f"{time.monotonic() - t0:7.0f}s {result['key']}: test NDCG@10 {sel:.4f} (epoch "
                  f"{result['best_epoch']}), last {result['test_last']['exclude']['ndcg@10']:.4f}, "
                  f"{result['train_seconds']:.0f}s", flush=True)
    return 1 if failed else 0


def cmd_merge(args) -> int:
    """Append the jobs of ``--source`` that ``--out`` lacks (runs made elsewhere)."""
    done = done_keys(args.out)
    new = [line for line in args.source.read_text().splitlines() if line.strip() and json.loads(line)["key"] not in done]
    with args.out.open("a") as f:
        f.writelines(line + "\n" for line in new)
    print(f"{len(new)} jobs added to {args.out}")
    return 0


def cmd_reread(args) -> int:
    """Read the test split again from a finished job's kept weights (``--save-dir``) and replace
    its test_selected and test_ranks_selected, e.g. after a fix to how a model is read; the row
    records the reading's code and time under ``reread``. Standard-split, id-item jobs only.
    It rewrites the runs file: not while a ``run`` may append to it."""
    import torch

    from persrec.models.checkpoint import load_checkpoint
    from persrec.models.recipe import recipe_named
    from persrec.testing.machine import code_commit

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    hits = [r for r in rows if any(s in r["key"] for s in args.only.split(","))] if args.only else []
    if not hits:
        raise SystemExit(f"no job in {args.out} matches --only {args.only!r}")
    for r in hits:
        if (r["items"], r["split"], r["protocol"]) != ("id", "loo", "heldout"):
            raise SystemExit(f"{r['key']}: reread reads standard-split, id-item, held-out jobs only")
        model = load_checkpoint(checkpoint_path(args.save_dir, r["key"])).build_model(args.device)
        selected, ranks = read_test(model, load(r["dataset"]), recipe_named(r["recipe"]), args.device)
        was = r["test_selected"]["exclude"]["ndcg@10"]
        r["test_selected"] = {k: {m: (round(v, 6) if isinstance(v, float) else v) for m, v in d.items()}
                              for k, d in selected.items()}
        r["test_ranks_selected"] = ranks.tolist()
        r["reread"] = dict(code=code_commit(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"), was_ndcg10=was)
        print(f"{r['key']}: test NDCG@10 {was:.4f} -> {r['test_selected']['exclude']['ndcg@10']:.4f}", flush=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


def cmd_list(args) -> int:
    done = done_keys(args.out)
    for j in plan(args.plan):
        print(("done " if j.key in done else "todo ") + j.key)
    return 0


# ------------------------------------------------------------------------------------ report
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _summary(values: list[float]) -> dict:
    m, sd = _mean_sd(values)
    return dict(mean=m, sd=sd, values=values)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (dataset, model, recipe, protocol, item representation, split) over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["recipe"], r["protocol"], r.get("items", "id"), r.get("split", "loo"))
        groups.setdefault(key, []).append(r)
    out = []
    for (dataset, model, recipe, protocol, items, split), rs in sorted(groups.items()):
        entry = dict(dataset=dataset, model=model, recipe=recipe, protocol=protocol, items=items, split=split,
                     seeds=sorted(r["seed"] for r in rs),
                     best_epoch=[r["best_epoch"] for r in rs], train_seconds=_mean_sd([r["train_seconds"] for r in rs])[0],
                     machines=sorted({(r["machine"]["gpu"] or r["machine"]["cpu"]) for r in rs}))
        for when in ("selected", "last"):
            for rule in RULES:
                for metric in ("ndcg@10", "hr@10", "ndcg@50", "mrr"):
                    entry[f"{when}/{rule}/{metric}"] = _summary([r[f"test_{when}"][rule][metric] for r in rs])
        if all("cold" in (r.get("test_by_target") or {}) for r in rs):  # a cold-start split: targets never trained on
            for part in ("cold", "warm"):
                for metric in ("ndcg@10", "hr@10", "hr@200"):
                    entry[f"{part}/{metric}"] = _summary([r["test_by_target"][part][metric] for r in rs])
            entry["cold_rows"] = [r["test_by_target"]["cold_rows"] for r in rs]
            if all("cold_top10_share" in r["test_by_target"] for r in rs):
                entry["cold_top10_share"] = _summary([r["test_by_target"]["cold_top10_share"] for r in rs])
        if all("zero_ids" in (r.get("test_by_target") or {}) for r in rs):  # the same weights, new items' ids zero
            zero = [r["test_by_target"]["zero_ids"] for r in rs]
            for part in ("cold", "warm", "all"):
                for metric in ("ndcg@10", "hr@10", "hr@200"):
                    entry[f"zero_ids/{part}/{metric}"] = _summary([z[part][metric] for z in zero])
            entry["zero_ids/cold_top10_share"] = _summary([z["cold_top10_share"] for z in zero])
        out.append(entry)
    return out


def _fmt(e: dict, key: str) -> str:
    m, sd = e[key]["mean"], e[key]["sd"]
    return f"{m:.4f}" if sd != sd else f"{m:.4f} ± {sd:.4f}"


def cmd_report(args) -> int:
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    groups = aggregate(rows)
    lines = ["# Recipe benchmark results", "",
             f"From `{args.out.name}` ({len(rows)} runs). Test metrics, mean ± sd over seeds; "
             "'selected' = the epoch with the best validation NDCG@10 (held-out protocol; the "
             "published protocol has no validation and reports its last epoch); "
             "'exclude' = every history item left out of the ranking, 'exclude-200' = the last 200 "
             "only (the official evaluation).", ""]
    for dataset in sorted({g["dataset"] for g in groups}):
        lines += [f"## {dataset}", "",
                  "| model | recipe | protocol | seeds | NDCG@10 selected | HR@10 selected | NDCG@10 last | NDCG@10 last, exclude-200 | best epoch | train s | machine |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in (g for g in groups if g["dataset"] == dataset):
            variant = "" if (g["items"], g["split"]) == ("id", "loo") else f" (items {g['items']}, split {g['split']})"
            lines.append(
                f"| {g['model']}{variant} | {g['recipe']} | {g['protocol']} | {len(g['seeds'])} | "
                f"{_fmt(g, 'selected/exclude/ndcg@10')} | {_fmt(g, 'selected/exclude/hr@10')} | "
                f"{_fmt(g, 'last/exclude/ndcg@10')} | {_fmt(g, 'last/exclude-200/ndcg@10')} | "
                f"{', '.join(map(str, g['best_epoch']))} | {g['train_seconds']:.0f} | {'; '.join(g['machines'])} |")
        lines.append("")
    cold = [g for g in groups if "cold/ndcg@10" in g]
    if cold:
        lines += ["## Cold start", "",
                  "Test rows whose target item was held out of training (cold) and the rest (warm), at the "
                  "validation-selected epoch, every history item excluded.", "",
                  "| data set | model | recipe | items | seeds | cold rows | NDCG@10 cold | HR@200 cold | NDCG@10 warm | cold / warm | NDCG@10 all | cold items' share of the top-10 slots |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in cold:
            for pre, note in (("", ""), ("zero_ids/", ", same weights with the untrained items' ids zero")):
                if f"{pre}cold/ndcg@10" not in g:
                    continue
                warm = g[f"{pre}warm/ndcg@10"]["mean"]
                ratio = g[f"{pre}cold/ndcg@10"]["mean"] / warm if warm else float("nan")
                every = "selected/exclude/ndcg@10" if not pre else f"{pre}all/ndcg@10"
                lines.append(f"| {g['dataset']} | {g['model']} | {g['recipe']}{note} | {g['items']} | {len(g['seeds'])} | "
                             f"{', '.join(map(str, g['cold_rows']))} | {_fmt(g, pre + 'cold/ndcg@10')} | "
                             f"{_fmt(g, pre + 'cold/hr@200')} | {_fmt(g, pre + 'warm/ndcg@10')} | {ratio:.2f} | {_fmt(g, every)} | "
                             f"{_fmt(g, pre + 'cold_top10_share') if pre + 'cold_top10_share' in g else ''} |")
        lines.append("")
    lines += comparison_lines(groups) + curve_lines(rows)
    md = args.out.with_name("recipe_bench.md")
    md.write_text("\n".join(lines))
    args.out.with_name("recipe_bench.json").write_text(json.dumps(groups, indent=1))
    print("\n".join(lines))
    print(f"-> {md}")
    return 0


def curve_lines(rows: list[dict]) -> list[str]:
    """Published-protocol jobs with a test curve: the last epoch (what the protocol reports) and
    the best epoch *on test*, which only a reading that picks its epoch on test would report."""
    curved = [r for r in rows if r["protocol"] == "published" and r.get("test_ndcg10")]
    if not curved:
        return []
    out = ["## Published protocol: the test curve", "",
           "The published protocol has no validation split; its test NDCG@10 every epoch is recorded. "
           "'Best on test' picks the epoch on the test rows themselves: an optimistic reading, shown "
           "only to size the gap to figures read that way, never a result.", "",
           "| job | last epoch | last, exclude-200 | best on test (epoch) | best on test, exclude-200 (epoch) |",
           "|---|---|---|---|---|"]
    for r in sorted(curved, key=lambda r: r["key"]):
        cells = []
        for rule in RULES:
            curve = r["test_ndcg10"][rule]
            top = max(range(len(curve)), key=curve.__getitem__)
            cells.append((f"{curve[-1]:.4f}", f"{curve[top]:.4f} ({top + 1})"))
        out.append(f"| {r['key']} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | {cells[1][1]} |")
    return out + [""]


# (what is compared, row A, row B): model/recipe/protocol of one dataset
COMPARISONS = [
    ("official vs ours (HSTU)", "hstu/official/heldout", "hstu/ours/heldout"),
    ("full softmax vs 128 per-position negatives (HSTU)", f"hstu/{FULL}/heldout", "hstu/official/heldout"),
    ("best vs official (HSTU)", "hstu/best/heldout", "hstu/official/heldout"),
    ("time bias: official vs official without it (HSTU)", "hstu/official/heldout", "hstu/official+time_bias=false/heldout"),
    ("HSTU vs SASRec, official recipe", "hstu/official/heldout", "sasrec/official/heldout"),
    ("HSTU official vs SASRec with a full softmax", "hstu/official/heldout", f"sasrec/{FULL}/heldout"),
    ("PerSRec K=8 recompress vs HSTU, best recipe", "persrec-recompress-k8/best/heldout", "hstu/best/heldout"),
    ("PerSRec K=8 incremental vs HSTU, best recipe", "persrec-incremental-k8/best/heldout", "hstu/best/heldout"),
]


def comparison_lines(groups: list[dict], key: str = "selected/exclude/ndcg@10") -> list[str]:
    """Each comparison whose two rows exist: the means and sds of ``key``, and "A > B", "A < B"
    or "no difference" (the mean +- sd intervals overlap, or a row has one seed)."""
    index = {(g["dataset"], f"{g['model']}/{g['recipe']}/{g['protocol']}"): g for g in groups
             if (g["items"], g["split"]) == ("id", "loo")}
    out = ["## Comparisons", "", f"Test NDCG@10 at the validation-selected epoch; mean ± sd over seeds.", "",
           "| data set | comparison | A | B | A / B | reading |", "|---|---|---|---|---|---|"]
    for dataset in sorted({g["dataset"] for g in groups}):
        for what, a_key, b_key in COMPARISONS:
            a, b = index.get((dataset, a_key)), index.get((dataset, b_key))
            if a is None or b is None:
                continue
            (ma, sa), (mb, sb) = (a[key]["mean"], a[key]["sd"]), (b[key]["mean"], b[key]["sd"])
            if sa != sa or sb != sb or abs(ma - mb) <= sa + sb:
                reading = "no difference"
            else:
                reading = "A > B" if ma > mb else "A < B"
            out.append(f"| {dataset} | {what} | {_fmt(a, key)} ({len(a['seeds'])}) | {_fmt(b, key)} ({len(b['seeds'])}) "
                       f"| {f'{ma / mb:.3f}' if mb else '-'} | {reading} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "list", "report", "merge", "reread"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=RUNS, help="the runs file (JSON lines)")
        if name in ("run", "list"):
            p.add_argument("--plan", default="ml1m")
        if name == "merge":
            p.add_argument("--source", type=Path, required=True, help="another runs file")
        if name in ("run", "reread"):
            p.add_argument("--only", default="", help="comma-separated substrings of job keys to keep")
            p.add_argument("--device", default="cpu")
            p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
            p.add_argument("--save-dir", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "recipe_bench",
                           help="each job's selected weights (never committed)")
        if name == "run":
            p.add_argument("--workers", type=int, default=1)
            p.add_argument("--deadline-s", type=float, default=None, help="stop after this long (jobs in flight are lost)")
            p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (smoke tests)")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "list": cmd_list, "report": cmd_report, "merge": cmd_merge,
            "reread": cmd_reread}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
