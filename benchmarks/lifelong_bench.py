"""Lifelong memory (issue 20): what PerSRec gives a user's whole history, and what it costs
per request, against the full-history models a streaming engineer would otherwise serve.

``cost`` (random weights; timing and FLOPs only), for histories of 50 to 2,698 events taken from
ml-latest-small's users (the table says how many users each length was timed on), one request
at a time on one thread:

- ``full-200``: HSTU re-run over the last 200 events for every event (today's baseline);
- ``full-whole``: HSTU re-run over the whole history for every event;
- ``kv-cache``: HSTU over the whole history with a per-user key/value cache: the new event
  attends to every earlier item's cached keys and values (exact; NVIDIA recsys-examples' way);
- ``persrec-incremental``: ``recommend(memory, recent)`` plus the amortised fold: one
  ``fold(memory, segment)`` every ``segment_len`` events, its cost divided by them;
- ``persrec-recompress``: the same with ``compress`` of the last 150 aged-out items;
- ``persrec-cached``: INCREMENTAL with its recent items' keys/values cached behind the memory
  (``PerSRec.extend_cache(..., memory)``, exact): an event is one position; after each fold the
  recent items' keys/values are rebuilt against the new memory, amortised like the fold. The
  stream serves it (Triton's ``recommend`` keeps the windows' keys/values:
  ``serving/window_cache.py``).

FLOPs are analytic (``models/flops.py``: matrix products, causal pairs only); times are medians.
State per user: raw ids as int32, keys/values and memories as float16.

``accuracy`` (trained weights from ``recipe_bench.py``, kept in ``runs/recipe_bench``): test
NDCG@10/HR@10 on ML-1M, its timestamped users 1-2,999 or ml-latest-small (``--dataset``; the
timestamped sets with their time bias) overall
and by history length (< 200, 200-499, >= 500 events), 3 seeds,
for HSTU over the last 200 / the whole history / the last 50, PerSRec INCREMENTAL folded over
the entire history, and PerSRec RECOMPRESS with 150 and 1,000 aged-out items; each PerSRec model
also with its memory withheld (the same raw part read beside the new-user memory: what the
memory adds); paired bootstrap intervals against HSTU over the last 200, over the seeds both
rows have. Each seed's per-user target ranks are kept in ``results/lifelong_<set>_ranks/s<seed>.json``:
a later run reads a seed's rows from there when their weights are gone (``runs/`` is not
committed), and replaces the rows it computes.

    .venv/bin/python benchmarks/lifelong_bench.py cost --threads 1          # -> results/lifelong_cost.{json,md,png}
    .venv/bin/python benchmarks/lifelong_bench.py accuracy --threads 2      # -> results/lifelong_ml1m.{json,md,png}
    .venv/bin/python benchmarks/lifelong_bench.py accuracy --dataset mlsmall  # -> results/lifelong_mlsmall.{json,md,png}
    .venv/bin/python benchmarks/lifelong_bench.py accuracy --dataset ml1m-ts  # -> results/lifelong_ml1m-ts.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from persrec.models import experiment, flops
from persrec.models.config import ModelConfig
from persrec.models.data import data_dir
from persrec.models.evaluate import pad_ids
from persrec.models.lifelong import fold_chains, lifelong_vectors, whole_segments
from persrec.models.loss import build_model
from persrec.testing.machine import code_commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parents[1] / "runs" / "recipe_bench"
DATASETS = {"ml1m": "ml-1m/ml-1m_sequences_original_ids.txt.gz", "ml1m-ts": "ml-1m/ratings_subset_users1-2999.dat.gz",
            "mlsmall": "ml-latest-small/ratings.csv", "dormant": "synthetic-dormant",
            "recurring": "synthetic-recurring", "steady": "synthetic-steady",
            "taste": "synthetic-taste"}
LENGTHS = (50, 100, 200, 400, 800, 1600, 2400, 2698)
ID_BYTES, HALF = 4, 2
BUDGET = 1000  # RECOMPRESS's longer history budget
NAMES = ("full-200", "full-whole", "kv-cache", "persrec-incremental", "persrec-recompress", "persrec-cached")


def config(num_items: int, **over) -> ModelConfig:
    """The ML-1M benchmark model: 2 blocks, dim 50, one head, K = 8, recent 50, segments of 50."""
    return ModelConfig(num_items=num_items, dim=50, num_layers=2, num_heads=1, head_dim=50, max_len=200,
                       recent_len=50, segment_len=50, dropout=0.0, **over)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def cost(args) -> dict:
    data = experiment.load_dataset(data_dir() / "ml-latest-small" / "ratings.csv")
    seqs = data.sequences.items
    torch.manual_seed(0)
    full = build_model(config(data.id_map.num_items)).eval()
    inc = build_model(config(data.id_map.num_items, num_memory_tokens=8, policy="incremental")).eval()
    rec = build_model(config(data.id_map.num_items, num_memory_tokens=8, policy="recompress")).eval()
    table = full.item_vectors()
    cfg, M = inc.cfg, inc.cfg.num_memory_tokens
    kv_per_item = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * HALF
    memory_bytes = int(np.prod(cfg.memory_shape)) * HALF
    rows = []
    for n in LENGTHS:
        users = [s[:n] for s in seqs if len(s) >= n][: args.users]
        if not users:
            continue
        t = {k: [] for k in NAMES}
        for h in users:
            row = lambda x: torch.from_numpy(np.asarray(x))[None]  # noqa: E731
            last200 = h[-200:]
            t["full-200"].append(_median_s(lambda: full.recommend(None, row(last200), torch.tensor([len(last200)])) @ table.T, args.repeats))
            t["full-whole"].append(_median_s(lambda: full.recommend(None, row(h), torch.tensor([n])) @ table.T, args.repeats))
            _, cache = full.extend_cache(None, torch.tensor([0]), row(h[:-1]), torch.tensor([n - 1])) if n > 1 else (None, None)
            t["kv-cache"].append(_median_s(lambda: full.extend_cache(cache, torch.tensor([n - 1]), row(h[-1:]), torch.tensor([1]))[0] @ table.T, args.repeats))
            folds = whole_segments(n, cfg)
            recent = h[folds * cfg.segment_len:]
            memory, _ = fold_chains(inc, [h], None, [folds])
            seg = row(h[: cfg.segment_len])
            fold_s = _median_s(lambda: inc.fold(memory, torch.tensor([True]), seg, torch.tensor([cfg.segment_len])), args.repeats)
            serve_s = _median_s(lambda: inc.recommend(memory, row(recent), torch.tensor([len(recent)])) @ table.T, args.repeats)
            t["persrec-incremental"].append(serve_s + fold_s / cfg.segment_len)
            aged = h[: folds * cfg.segment_len][-(cfg.max_len - cfg.recent_len):] if folds else h[:1]
            comp_s = _median_s(lambda: rec.compress(row(aged), torch.tensor([len(aged)])), args.repeats)
            t["persrec-recompress"].append(serve_s + comp_s / cfg.segment_len)
            one = lambda x: torch.tensor([x])  # noqa: E731
            _, rcache = inc.extend_cache(None, one(0), row(recent[:-1]), one(len(recent) - 1), memory)
            event_s = _median_s(lambda: inc.extend_cache(rcache, one(len(recent) - 1), row(recent[-1:]), one(1), memory)[0] @ table.T, args.repeats)
            kept = row(recent[: cfg.recent_len - 1])  # what a fold leaves in the window
            rebuild_s = _median_s(lambda: inc.extend_cache(None, one(0), kept, one(kept.shape[1]), memory), args.repeats)
            t["persrec-cached"].append(event_s + (fold_s + rebuild_s) / cfg.segment_len)
        recent_n = n - whole_segments(n, cfg) * cfg.segment_len
        hist_n = min(whole_segments(n, cfg) * cfg.segment_len, cfg.max_len - cfg.recent_len)
        mflops = {
            "full-200": flops.full_request_flops(full.cfg, min(n, 200)),
            "full-whole": flops.encoder_flops(full.cfg, n) + flops.score_flops(full.cfg),
            "kv-cache": flops.encoder_flops(full.cfg, 1, prefix=n - 1) + flops.score_flops(full.cfg),
            "persrec-incremental": flops.memory_request_flops(cfg, recent_n) + flops.fold_flops(cfg, cfg.segment_len) / cfg.segment_len,
            "persrec-recompress": flops.memory_request_flops(cfg, recent_n) + flops.compress_flops(cfg, hist_n) / cfg.segment_len,
            "persrec-cached": flops.cached_request_flops(cfg, recent_n) + flops.cached_update_flops(cfg) / cfg.segment_len,
        }
        state = {
            "full-200": min(n, 200) * ID_BYTES, "full-whole": n * ID_BYTES, "kv-cache": n * kv_per_item,
            "persrec-incremental": memory_bytes + (cfg.recent_len + cfg.segment_len - 1) * ID_BYTES,
            "persrec-recompress": memory_bytes + (cfg.recent_len + cfg.segment_len - 1 + cfg.max_len - cfg.recent_len) * ID_BYTES,
            # the most the window holds between folds, with every item's keys/values
            "persrec-cached": memory_bytes + (cfg.recent_len + cfg.segment_len - 1) * (ID_BYTES + kv_per_item),
        }
        rows.append(dict(history=n, users_timed=len(users), ms={k: 1000 * statistics.median(v) for k, v in t.items()},
                         mflops={k: v / 1e6 for k, v in mflops.items()}, state_bytes=state))
        print(f"{n:5d} ({len(users)} users): " + "  ".join(f"{k} {1000 * statistics.median(v):.2f} ms" for k, v in t.items()), flush=True)
    # Over a user's life the recent part cycles through recent_len .. recent_len + segment_len - 1
    # items between folds: the mean request of that cycle, against HSTU over 200 events.
    cycle = range(cfg.recent_len, cfg.recent_len + cfg.segment_len)
    mean_mflops = statistics.fmean(flops.memory_request_flops(cfg, r) for r in cycle) / 1e6 \
        + flops.fold_flops(cfg, cfg.segment_len) / cfg.segment_len / 1e6
    def cached_cycle(c: ModelConfig) -> float:
        return (statistics.fmean(flops.cached_request_flops(c, r) for r in cycle)
                + flops.cached_update_flops(c) / c.segment_len) / 1e6

    cached_mflops = cached_cycle(cfg)
    timed = dataclasses.replace(cfg, time_bias=True, request_time=True)  # the timestamped sets' models
    return dict(mode="cost", rows=rows, model=cfg.to_dict() | {"num_memory_tokens": 8},
                persrec_incremental_cycle_mean_mflops=mean_mflops, persrec_cached_cycle_mean_mflops=cached_mflops,
                persrec_cached_request_time_cycle_mean_mflops=cached_cycle(timed),
                full_200_mflops=flops.full_request_flops(full.cfg, 200) / 1e6,
                machine=dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__),
                command=f"benchmarks/lifelong_bench.py cost --threads {args.threads} --users {args.users} --repeats {args.repeats}",
                notes="times: median per request at batch 1, each PerSRec row with its amortised update "
                      "(fold or compress time / segment_len); FLOPs analytic, causal pairs only")


def cost_report(res: dict, out: Path) -> None:
    names = [n for n in NAMES if n in res["rows"][0]["ms"]]
    lines = ["| history | users timed | " + " | ".join(f"{n} ms / MFLOPs / state B" for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for r in res["rows"]:
        cells = [f"{r['ms'][n]:.2f} / {r['mflops'][n]:.1f} / {r['state_bytes'][n]:,}" for n in names]
        lines.append(f"| {r['history']:,} | {r['users_timed']} | " + " | ".join(cells) + " |")
    lines += ["", f"PerSRec INCREMENTAL over a whole fold cycle (recent part {res['model']['recent_len']} to "
                  f"{res['model']['recent_len'] + res['model']['segment_len'] - 1} items, plus the amortised fold): "
                  f"{res['persrec_incremental_cycle_mean_mflops']:.2f} MFLOPs per request on average, "
                  f"{res['persrec_incremental_cycle_mean_mflops'] / res['full_200_mflops']:.0%} of HSTU over 200 events "
                  f"({res['full_200_mflops']:.1f})."]
    if "persrec_cached_cycle_mean_mflops" in res:
        lines += ["", f"With the recent items' keys/values cached (persrec-cached): "
                      f"{res['persrec_cached_cycle_mean_mflops']:.2f} MFLOPs per request on average over the cycle, "
                      f"{res['persrec_cached_cycle_mean_mflops'] / res['full_200_mflops']:.0%} of HSTU over 200 events."]
    if "persrec_cached_request_time_cycle_mean_mflops" in res:
        rt = res["persrec_cached_request_time_cycle_mean_mflops"]
        lines += ["", f"The same for a request-time model (each event sends the previous item again): {rt:.2f} MFLOPs, "
                      f"{rt / res['full_200_mflops']:.0%} of HSTU over 200 events."]
    (out / "lifelong_cost.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["history"] for r in res["rows"]]
    for n in names:
        axes[0].plot(xs, [r["ms"][n] for r in res["rows"]], marker="o", label=n)
        axes[1].plot(xs, [r["mflops"][n] for r in res["rows"]], marker="o", label=n)
    for ax, what in zip(axes, ("ms per request (batch 1, 1 thread)", "MFLOPs per request")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("history length (events)"), ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Cost per request vs history length (incl. the amortised memory update)")
    fig.tight_layout()
    fig.savefig(out / "lifelong_cost.png", dpi=110)
    print("\n".join(lines))


# ---------------------------------------------------------------------------------- accuracy
BUCKETS = ((0, 200, "< 200"), (200, 500, "200-499"), (500, 10**9, ">= 500"))


@torch.no_grad()
def whole_history_vectors(model, histories, times, request_ts, device, max_tokens: int = 400_000) -> torch.Tensor:
    """A model without memory tokens over each user's entire history in one pass (batches of
    similar length, at most ``max_tokens`` attention pairs per batch); ``times``/``request_ts``
    as ``evaluate.user_vectors`` takes them (None without timestamps)."""
    from persrec.models.evaluate import user_vectors

    out = torch.empty(len(histories), model.cfg.dim)
    order = np.argsort([-len(h) for h in histories], kind="stable")  # longest first: sizes the batch
    start = 0
    while start < len(order):
        n = len(histories[order[start]])
        idx = order[start : start + max(1, max_tokens // max(n * n, 1))]
        out[torch.from_numpy(idx)] = user_vectors(
            model, [histories[u] for u in idx], None if times is None else [times[u] for u in idx], device,
            None if request_ts is None else request_ts[idx], whole=True).cpu()
        start += len(idx)
    return out


LONG_FOLDS_ROW = "PerSRec INCREMENTAL trained as served, gradient through 8 more folds"
CARRY_ROW = "PerSRec INCREMENTAL with the memory carry, trained as served (8 folds)"
WITHHELD = {  # model: (its row with the memory withheld, its row as served)
    "incremental-lifelong": ("PerSRec INCREMENTAL trained as served, memory withheld",
                             "PerSRec INCREMENTAL trained as served, whole history"),
    "incremental-long-folds": (f"{LONG_FOLDS_ROW}, memory withheld", f"{LONG_FOLDS_ROW}, whole history"),
    "incremental-carry": (f"{CARRY_ROW}, memory withheld", f"{CARRY_ROW}, whole history"),
    "recompress": ("PerSRec RECOMPRESS, memory withheld", "PerSRec RECOMPRESS, its own budget aged out"),
}


def raw_part(cfg: ModelConfig, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """What the served model reads raw beside its memory: each sequence after its whole
    segments (``recent_len`` to ``recent_len + segment_len - 1`` items, or all of a short one).
    Read alone it folds nothing, so the model answers from the new-user memory."""
    return [s[whole_segments(len(s), cfg) * cfg.segment_len:] for s in seqs]


def accuracy(args) -> dict:
    from persrec.models.checkpoint import load_checkpoint
    from persrec.models.evaluate import Evaluator, SeenRule
    from persrec.models.metrics import metrics_from_ranks, ndcg_at, paired_ratio_interval, rank_of_target

    path = DATASETS[args.dataset]
    data = experiment.load_dataset(path if path in experiment.GENERATED else data_dir() / path)
    rows_ = data.split.test
    times, request = rows_.history_ts, rows_.target_ts
    lengths = np.array([len(h) for h in rows_.history])
    exclude = pad_ids(rows_.history)
    targets = torch.as_tensor(rows_.target)
    per_row: dict[str, dict[int, torch.Tensor]] = {}  # row -> seed -> each test user's target rank
    stored = args.out / f"lifelong_{args.dataset}_ranks"  # a seed's ranks outlive its weights

    def add(name: str, vectors: torch.Tensor, model) -> None:
        scores = model.score(vectors)
        per_row.setdefault(name, {})[seed] = rank_of_target(scores, targets, exclude, exclude_target=True)

    def last_window_vectors(model, window: int) -> torch.Tensor:  # each user's last ``window`` events
        cut_times = None if times is None else [t[-window:] for t in times]
        return whole_history_vectors(model, [h[-window:] for h in rows_.history], cut_times, request, "cpu")

    for seed in args.seeds:
        ck = lambda model, recipe: load_checkpoint(RUNS / f"{args.dataset}__{model}__{recipe}__heldout__s{seed}.pt")  # noqa: E731
        found = {}
        for label, (model_name, recipe) in {
            "hstu": ("hstu", "best"), "hstu-anywhere": ("hstu", "best+history=anywhere"),
            "incremental": ("persrec-incremental-k8", "best"),
            "incremental-lifelong": ("persrec-incremental-k8", "best+history=lifelong"),
            "incremental-long-folds": ("persrec-incremental-k8", "best+history=lifelong+fold_grad=8"),
            "incremental-carry": ("persrec-incremental-k8", "best+history=lifelong+fold_grad=8+memory_carry=true"),
            "recompress": ("persrec-recompress-k8", "best"),
        }.items():
            try:
                found[label] = ck(model_name, recipe).build_model("cpu")
            except FileNotFoundError:
                print(f"seed {seed}: no {model_name}/{recipe} weights in {RUNS}; row skipped")
        if "hstu" in found:
            m = found["hstu"]
            own = f"HSTU, last {m.cfg.max_len}"  # its own window (200; the generated set's small model: 40)
            for name, window in ((own, m.cfg.max_len), ("HSTU, last 50", 50)):
                if window > m.cfg.max_len:
                    continue
                add(name, last_window_vectors(m, window), m)
            add("HSTU, whole history", whole_history_vectors(m, rows_.history, times, request, "cpu"), m)
        if "hstu-anywhere" in found:  # trained on windows anywhere in a history, read over its last max_len
            m = found["hstu-anywhere"]
            add(f"HSTU trained on windows anywhere, last {m.cfg.max_len}", last_window_vectors(m, m.cfg.max_len), m)
            add("HSTU trained on windows anywhere, whole history",
                whole_history_vectors(m, rows_.history, times, request, "cpu"), m)
        for label, name in (("incremental", "PerSRec INCREMENTAL, whole history"),
                            ("incremental-lifelong", "PerSRec INCREMENTAL trained as served, whole history"),
                            ("incremental-long-folds", f"{LONG_FOLDS_ROW}, whole history"),
                            ("incremental-carry", f"{CARRY_ROW}, whole history")):
            if label in found:
                add(name, lifelong_vectors(found[label], rows_.history, times, request), found[label])
        if "recompress" in found:
            m = found["recompress"]
            # max_len - recent_len: 150 for the real sets, 30 for the generated one
            add("PerSRec RECOMPRESS, its own budget aged out", lifelong_vectors(m, rows_.history, times, request), m)
            add(f"PerSRec RECOMPRESS, last {BUDGET:,} aged out",
                lifelong_vectors(m, rows_.history, times, request, recompress_budget=BUDGET), m)
        for label, (name, _) in WITHHELD.items():
            if label in found:  # the same raw part, beside the new-user memory: what the memory adds
                m = found[label]
                recent, recent_times = raw_part(m.cfg, rows_.history), None if times is None else raw_part(m.cfg, times)
                add(name, lifelong_vectors(m, recent, recent_times, request), m)
        kept = stored / f"s{seed}.json"
        old = json.loads(kept.read_text())["ranks"] if kept.is_file() else {}
        new = {name: r[seed].tolist() for name, r in per_row.items() if seed in r}
        for name, ranks in old.items():  # rows whose weights are gone keep their stored ranks
            if name not in new and len(ranks) == len(targets):
                per_row.setdefault(name, {})[seed] = torch.tensor(ranks)
        if new:
            stored.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(dict(
                dataset=args.dataset, seed=seed, ranks=old | new, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                code=code_commit("models", "benchmarks/lifelong_bench.py"))))
        print(f"seed {seed}: computed {sorted(new)}; read from {kept}: {sorted(set(old) - set(new))}", flush=True)
    base = next((name for name in per_row if name.startswith("HSTU, last") and name != "HSTU, last 50"), None)
    if not per_row:
        raise SystemExit(f"no trained weights for {args.dataset} seeds {args.seeds} in {RUNS}: train them first "
                         f"(benchmarks/recipe_bench.py run --plan timed-{args.dataset} / {args.dataset}-lifelong)")

    def paired(ranks, ref, sel):  # per-user NDCG@10 averaged over the seeds both have, then the bootstrap ratio
        common = sorted(set(ranks) & set(ref or {}))
        if not common:
            return None
        a = torch.stack([ndcg_at(ranks[s][sel], 10) for s in common]).mean(0)
        b = torch.stack([ndcg_at(ref[s][sel], 10) for s in common]).mean(0)
        return paired_ratio_interval(a, b) if float(b.mean()) > 0 else None

    served_of = {withheld: served for withheld, served in WITHHELD.values()}
    table = []
    for name, by_seed in per_row.items():
        entry, ranks = dict(row=name, seeds=len(by_seed), seed_list=sorted(by_seed)), list(by_seed.values())
        for lo, hi, label in ((0, 10**9, "all"),) + BUCKETS:
            sel = torch.from_numpy((lengths >= lo) & (lengths < hi))
            entry[f"{label}/users"] = int(sel.sum())
            if not sel.any():  # a bucket no user falls in (the generated set's lengths)
                entry |= {f"{label}/{metric}": dict(mean=None, sd=None) for metric in ("ndcg@10", "hr@10")}
                continue
            # where NDCG@10 is 0 for nearly everyone, the ranks still move
            entry[f"{label}/median_rank"] = statistics.fmean(float(r[sel].float().median()) for r in ranks)
            vals = [metrics_from_ranks(r[sel], ks=(10,)) for r in ranks]
            for metric in ("ndcg@10", "hr@10"):
                xs = [v[metric] for v in vals]
                entry[f"{label}/{metric}"] = dict(mean=statistics.fmean(xs), sd=statistics.stdev(xs) if len(xs) > 1 else None)
            entry[f"{label}/vs_hstu200"] = paired(by_seed, per_row.get(base), sel)
            if name in served_of:  # the served row against this one: what the memory adds
                entry[f"{label}/served_vs_withheld"] = paired(per_row.get(served_of[name]), by_seed, sel) \
                    if served_of[name] in per_row else None
        table.append(entry)
    return dict(mode="accuracy", dataset=args.dataset, rows=table, seeds=list(args.seeds),
                machine=dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__),
                command=f"benchmarks/lifelong_bench.py accuracy --dataset {args.dataset} --seeds {' '.join(map(str, args.seeds))}")


def accuracy_report(res: dict, out: Path) -> None:
    fmt = lambda d: "-" if d["sd"] is None and d["mean"] is None else (  # noqa: E731
        f"{d['mean']:.4f}" if d["sd"] is None else f"{d['mean']:.4f} ± {d['sd']:.4f}")
    ci = lambda r: "-" if not r else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"  # noqa: E731
    labels = ("all",) + tuple(b[2] for b in BUCKETS)
    head = ("| row | seeds | " + " | ".join(f"NDCG@10 {label} ({res['rows'][0][label + '/users']:,} users)" for label in labels)
            + " | vs HSTU over its window, all | vs HSTU over its window, >= 500 | median rank of the target, all |")
    lines = [head, "|---" * 9 + "|"]
    for e in res["rows"]:
        rank = e.get("all/median_rank")
        lines.append(f"| {e['row']} | {', '.join(map(str, e['seed_list']))} | " + " | ".join(fmt(e[f"{label}/ndcg@10"]) for label in labels)
                     + f" | {ci(e.get('all/vs_hstu200'))} | {ci(e.get('>= 500/vs_hstu200'))} | "
                     + ("-" if rank is None else f"{rank:,.0f}") + " |")
    gains = [e for e in res["rows"] if "all/served_vs_withheld" in e]
    if gains:
        lines += ["", "What the memory adds: NDCG@10 as served / with the memory withheld, paired over users "
                  "(95% bootstrap interval)", "",
                  "| model | all | < 200 | 200-499 | >= 500 |", "|---|---|---|---|---|"]
        lines += [f"| {e['row'].removesuffix(', memory withheld')} | "
                  + " | ".join(ci(e.get(f"{label}/served_vs_withheld")) for label in labels)
                  + " |" for e in gains]
    (out / f"lifelong_{res['dataset']}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b[2] for b in BUCKETS]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(res["rows"])
    for i, e in enumerate(res["rows"]):
        means = [e[f"{b}/ndcg@10"]["mean"] or 0.0 for b in labels]
        sds = [e[f"{b}/ndcg@10"]["sd"] or 0.0 for b in labels]
        ax.bar(np.arange(len(labels)) + i * width, means, width, yerr=sds, capsize=2, label=e["row"])
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2,
                  [f"{b} events\n({res['rows'][0][b + '/users']:,} users)" for b in labels])
    ax.set_ylabel("test NDCG@10 (mean ± sd over seeds)")
    ax.set_title(f"{res['dataset']}: NDCG@10 by history length")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"lifelong_{res['dataset']}.png", dpi=110)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cost", "accuracy"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--users", type=int, default=8, help="cost: users timed per length (at most)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="ml1m", help="accuracy: whose trained weights")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "cost":
        res = cost(args) | dict(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), code=code_commit("models", "benchmarks/lifelong_bench.py"))
        (args.out / "lifelong_cost.json").write_text(json.dumps(res, indent=1))
        cost_report(res, args.out)
    else:
        res = accuracy(args) | dict(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), code=code_commit("models", "benchmarks/lifelong_bench.py"))
        (args.out / f"lifelong_{args.dataset}.json").write_text(json.dumps(res, indent=1))
        accuracy_report(res, args.out)


if __name__ == "__main__":
    main()
