"""models/logs.py, data.py and synthetic.py on the real MovieLens files in ../shared/data (or
$PERSREC_DATA_DIR) and on small files written to tmp_path."""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.models.data import (
    IdMap,
    SequenceData,
    build_sequences,
    data_dir,
    default_dataset_path,
    k_core,
    leave_one_out,
)
from persrec.models.logs import Interactions, detect_format, load_interactions, parse_columns
from persrec.models.synthetic import (
    dormant_interest_interactions,
    steady_taste_interactions,
    synthetic_interactions,
)

DATA = Path(
    os.environ.get("PERSREC_DATA_DIR")
    or Path(__file__).resolve().parents[2].parent / "shared" / "data"
)
ML1M_SEQ = DATA / "ml-1m" / "ml-1m_sequences_original_ids.txt.gz"
ML1M_DAT = DATA / "ml-1m" / "ratings_subset_users1-2999.dat.gz"
LATEST_CSV = DATA / "ml-latest-small" / "ratings.csv"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"dataset file {path} not found (set PERSREC_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def ml1m():
    interactions = load_interactions(_need(ML1M_SEQ))
    seqs, id_map = build_sequences(interactions)
    return interactions, seqs, id_map


# ---------------------------------------------------------------------------- real data


def test_ml1m_sequences_counts_and_order(ml1m):
    interactions, seqs, id_map = ml1m
    assert len(interactions) == 1_000_209
    assert interactions.timestamps is None
    assert len(seqs) == 6_040
    assert id_map.num_items == 3_706
    assert int(seqs.lengths().sum()) == 1_000_209

    with gzip.open(ML1M_SEQ, "rt") as f:
        head = [next(f).split() for _ in range(20)]
    user_1 = [item for user, item in head if user == "1"]
    assert seqs.user_ids[0] == "1"
    assert id_map.decode(seqs.items[0][: len(user_1)]) == user_1
    # File order is kept exactly, so the first items get dense ids 1, 2, 3, ...
    assert seqs.items[0][:5].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(interactions.items[: len(user_1)], user_1)


def test_ml1m_leave_one_out(ml1m):
    _, seqs, _ = ml1m
    split = leave_one_out(seqs)
    lengths = seqs.lengths()
    assert lengths.min() >= 3  # ML-1M users have at least 20 ratings
    assert len(split.valid) == len(split.test) == 6_040
    assert len(split.train) == len(seqs)
    assert int(split.train.lengths().sum()) == 1_000_209 - 2 * 6_040
    for u in (0, 17, 6_039):
        s = seqs.items[u]
        np.testing.assert_array_equal(split.train.items[u], s[:-2])
        np.testing.assert_array_equal(split.valid.history[u], s[:-2])
        np.testing.assert_array_equal(split.test.history[u], s[:-1])
        assert split.valid.target[u] == s[-2] and split.test.target[u] == s[-1]
    assert split.valid.history_ts is None and split.test.target_ts is None


def test_grouplens_dat_subset():
    interactions = load_interactions(_need(ML1M_DAT))
    assert detect_format(ML1M_DAT) == "grouplens-dat"
    assert len(interactions) == 487_650
    assert interactions.timestamps is not None and interactions.timestamps.dtype == np.int64
    with gzip.open(ML1M_DAT, "rt", encoding="latin-1") as f:
        first_line = f.readline().strip().split("::")
    assert [interactions.users[0], interactions.items[0], str(interactions.timestamps[0])] == [
        first_line[0],
        first_line[1],
        first_line[3],
    ]
    seqs, _ = build_sequences(interactions)
    assert len(seqs) == 2_999
    assert seqs.user_ids[:3] == ["1", "2", "3"]
    assert all(np.all(np.diff(t) >= 0) for t in seqs.timestamps)
    # 2000-10-04 .. 2003-02-27 UTC, as the README says
    assert (
        970_617_600 <= interactions.timestamps.min()
        and interactions.timestamps.max() < 1_046_390_400
    )
    split = leave_one_out(seqs)
    assert np.all(split.test.target_ts >= split.valid.target_ts)


def test_ml_latest_small_csv():
    interactions = load_interactions(_need(LATEST_CSV))
    assert detect_format(LATEST_CSV) == "csv"
    assert len(interactions) == 100_836
    assert (interactions.users[0], interactions.items[0], interactions.timestamps[0]) == (
        "1",
        "1",
        964_982_703,
    )
    seqs, id_map = build_sequences(interactions)
    assert len(seqs) == 610
    assert id_map.num_items == 9_724
    assert all(np.all(np.diff(t) >= 0) for t in seqs.timestamps)


def test_data_dir_and_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSREC_DATA_DIR", raising=False)
    assert data_dir() == Path(__file__).resolve().parents[2].parent / "shared" / "data"
    monkeypatch.setenv("PERSREC_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert default_dataset_path() is None
    target = tmp_path / "ml-1m" / "ml-1m_sequences_original_ids.txt.gz"
    target.parent.mkdir()
    target.write_bytes(gzip.compress(b"1 10\n"))
    assert default_dataset_path() == target


# ---------------------------------------------------------------------------- small files


def test_csv_iso_timestamps_custom_columns(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "who,what,when,score\n"
        "alice,007,2021-01-01T10:00:00Z,1\n"
        "bob,x,2021-01-01T09:00:00+02:00,1\n"
        "alice,y,2021-01-01T09:00:00,1\n"
        "alice,z,2021-01-01T09:00:00,1\n"
    )
    interactions = load_interactions(path, user_col="who", item_col="what", time_col="when")
    assert interactions.items.tolist() == ["007", "x", "y", "z"]  # ids stay strings
    assert interactions.timestamps.tolist() == [1609495200, 1609484400, 1609491600, 1609491600]
    seqs, id_map = build_sequences(interactions)
    assert seqs.user_ids == ["alice", "bob"]
    # Sorted by time; y before z (equal times keep file order).
    assert id_map.decode(seqs.items[0]) == ["y", "z", "007"]
    with pytest.raises(ValueError, match="cannot find a user column"):
        load_interactions(path)
    with pytest.raises(ValueError, match="no time column 'missing'"):
        load_interactions(path, user_col="who", item_col="what", time_col="missing")


def test_csv_mixed_time_strings_and_autodetected_names(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"user_id,item_id,ts\n1,a,100\n1,b,2021-01-01\n"))
    interactions = load_interactions(path)
    assert interactions.timestamps.tolist() == [100, 1609459200]


def test_parquet(tmp_path):
    path = tmp_path / "events.parquet"
    table = pa.table(
        {
            "user_id": pa.array([5, 5, 7]),
            "item_id": pa.array(["a", "b", "a"]).dictionary_encode(),
            "time": pa.array([3_000, 1_000, 2_000], pa.timestamp("ms")),
        }
    )
    pq.write_table(table, path)
    interactions = load_interactions(path)
    assert interactions.users.tolist() == ["5", "5", "7"]
    assert interactions.timestamps.tolist() == [3, 1, 2]
    seqs, id_map = build_sequences(interactions)
    assert [id_map.decode(s) for s in seqs.items] == [["b", "a"], ["a"]]


def test_bad_lines_name_the_line(tmp_path):
    seq = tmp_path / "seq.txt"
    seq.write_text("1 10\n1 11\n1 12 13\n")
    with pytest.raises(ValueError, match=r"line 3: expected 2 fields, got 3"):
        load_interactions(seq, fmt="ml1m-seq")
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::10::5::100\n1::11::5\n")
    with pytest.raises(ValueError, match=r"line 2: expected 4 fields, got 3"):
        load_interactions(dat)
    dat.write_text("1::10::5::100\n1::11::5::soon\n")
    with pytest.raises(ValueError, match=r"line 2: timestamp .soon. is not an integer"):
        load_interactions(dat)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("userId,movieId,timestamp\n1,2,3\n1,2\n")
    with pytest.raises(ValueError, match=r"line 3: expected 3 fields, got 2"):
        load_interactions(bad_csv)
    bad_csv.write_text("userId,movieId,timestamp\n1,2,3\n1,,4\n")
    with pytest.raises(ValueError, match=r"line 3: empty 'movieId'"):
        load_interactions(bad_csv)
    bad_csv.write_text("userId,movieId,timestamp\n1,2,3\n1,4,yesterday\n")
    with pytest.raises(ValueError, match=r"line 3: 'timestamp': cannot parse time 'yesterday'"):
        load_interactions(bad_csv)
    odd = tmp_path / "odd.txt"
    odd.write_text("a b c\n")
    with pytest.raises(ValueError, match="cannot detect the format"):
        load_interactions(odd)
    with pytest.raises(ValueError, match="unknown format"):
        load_interactions(seq, fmt="json")


def test_ml1m_seq_without_trailing_newline_and_crlf(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_bytes(b"2 b\r\n1 a\r\n2 a")
    interactions = load_interactions(path)
    assert interactions.users.tolist() == ["2", "1", "2"]
    seqs, id_map = build_sequences(interactions)
    assert seqs.user_ids == ["2", "1"]
    assert id_map.items.tolist() == ["b", "a"]
    assert [s.tolist() for s in seqs.items] == [[1, 2], [2]]


# MovieLens-100K u.data: tab separated, no header; user 196's events are out of time order.
U_DATA = (
    b"196\t242\t3\t881250949\n"
    b"186\t302\t3\t891717742\n"
    b"196\t377\t1\t878887116\n"
    b"186\t242\t5\t891717742\n"
    b"196\t51\t2\t880606923\n"
)


def test_movielens_100k_u_data(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(U_DATA)
    assert detect_format(path) == "movielens-100k"
    interactions = load_interactions(path)
    assert interactions.users.tolist() == ["196", "186", "196", "186", "196"]
    assert interactions.items.tolist() == ["242", "302", "377", "242", "51"]  # ratings dropped
    assert interactions.timestamps.dtype == np.int64
    times = [881250949, 891717742, 878887116, 891717742, 880606923]
    assert interactions.timestamps.tolist() == times
    seqs, id_map = build_sequences(interactions)
    assert seqs.user_ids == ["196", "186"]
    assert [id_map.decode(s) for s in seqs.items] == [["377", "51", "242"], ["302", "242"]]
    assert [t.tolist() for t in seqs.timestamps] == [
        [878887116, 880606923, 881250949],
        [891717742, 891717742],  # equal times keep file order
    ]
    explicit = load_interactions(path, fmt="movielens-100k")
    np.testing.assert_array_equal(explicit.timestamps, interactions.timestamps)
    with pytest.raises(ValueError, match="column names apply to csv, tsv, parquet and jsonl only"):
        load_interactions(path, user_col="user")
    path.write_bytes(b"196\t242\t3\t881250949\n186\t302\t3\tlater\n")
    with pytest.raises(ValueError, match=r"line 2: timestamp .later. is not an integer"):
        load_interactions(path)
    path.write_bytes(b"196\t242\t3\t881250949\n186\t302\t3\n")
    with pytest.raises(ValueError, match=r"line 2: expected 4 fields, got 3"):
        load_interactions(path)


def test_movielens_100k_gzip(tmp_path):
    path = tmp_path / "u1.base.gz"
    path.write_bytes(gzip.compress(U_DATA))
    assert detect_format(path) == "movielens-100k"
    interactions = load_interactions(path)
    assert len(interactions) == 5
    assert interactions.timestamps.tolist()[:2] == [881250949, 891717742]


def test_sasrec_tab_separated_pairs_are_ml1m_seq(tmp_path):
    path = tmp_path / "ml-1m.txt"
    path.write_text("1\t10\n1\t11\n2\t10\n")
    assert detect_format(path) == "ml1m-seq"
    interactions = load_interactions(path)
    assert interactions.timestamps is None
    assert interactions.users.tolist() == ["1", "1", "2"]
    assert interactions.items.tolist() == ["10", "11", "10"]
    # Four fields that are not all integers, or four space-separated fields, are not u.data.
    path.write_text("1\t10\t4.5\t881250949\n")
    with pytest.raises(ValueError, match="cannot detect the format"):
        detect_format(path)
    path.write_text("1 10 4 881250949\n")
    with pytest.raises(ValueError, match="cannot detect the format"):
        detect_format(path)
    assert load_interactions(path, fmt="movielens-100k").timestamps.tolist() == [881250949]


def _json_lines(path: Path, records: list[dict]) -> Path:
    import json

    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_amazon_reviews_2023_json_lines_with_millisecond_times(tmp_path):
    # Amazon Reviews 2023's review files: one object per line, review text beside the ids,
    # `parent_asin` (the product) and `asin` (its variant), times in unix milliseconds.
    review = dict(rating=5.0, title="ok", text="fine, \"really\"", images=[], helpful_vote=0, verified_purchase=True)
    records = [review | dict(user_id="AG1", asin="B01v1", parent_asin="B01", timestamp=1_588_687_728_923),
               review | dict(user_id="AG2", asin="B02v1", parent_asin="B02", timestamp=1_588_600_000_000),
               review | dict(user_id="AG1", asin="B02v2", parent_asin="B02", timestamp=1_588_600_000_999)]
    path = _json_lines(tmp_path / "Beauty.jsonl.gz", records)
    assert detect_format(path) == "jsonl"
    interactions = load_interactions(path)
    assert interactions.users.tolist() == ["AG1", "AG2", "AG1"]
    assert interactions.items.tolist() == ["B01", "B02", "B02"]  # parent_asin before asin
    assert interactions.timestamps.tolist() == [1_588_687_728, 1_588_600_000, 1_588_600_000]
    seqs, id_map = build_sequences(interactions)
    assert [id_map.decode(s) for s in seqs.items] == [["B02", "B01"], ["B02"]]
    # named by hand, and sniffed from the first line when the name says nothing
    plain = _json_lines(tmp_path / "reviews.txt", records)
    assert detect_format(plain) == "jsonl"
    assert load_interactions(plain, item_col="asin").items.tolist() == ["B01v1", "B02v1", "B02v2"]


def test_amazon_2018_and_yelp_json_lines_find_their_columns(tmp_path):
    amazon = _json_lines(tmp_path / "Books_5.json", [
        dict(overall=5.0, reviewerID="A1", asin="0001", reviewTime="09 13, 2009", unixReviewTime=1_252_800_000),
        dict(overall=4.0, reviewerID="A2", asin="0002", reviewTime="12 5, 2012", unixReviewTime=1_354_665_600)])
    got = load_interactions(amazon)
    assert (got.users.tolist(), got.items.tolist(), got.timestamps.tolist()) == (
        ["A1", "A2"], ["0001", "0002"], [1_252_800_000, 1_354_665_600])
    yelp = _json_lines(tmp_path / "yelp_academic_dataset_review.json", [
        dict(review_id="r1", user_id="u1", business_id="b1", stars=5, date="2016-03-09 00:44:42")])
    got = load_interactions(yelp)
    assert (got.users.tolist(), got.items.tolist(), got.timestamps.tolist()) == (["u1"], ["b1"], [1_457_484_282])


def test_a_csv_without_a_header_is_read_by_column_positions(tmp_path):
    # Amazon's ratings-only files: item,user,rating,timestamp and no header.
    path = tmp_path / "ratings_Beauty.csv"
    path.write_text("0205616461,A39HTATAQ9V7YF,5.0,1369699200\n0558925278,A3JM6GV9MNOF9X,3.0,1355443200\n")
    with pytest.raises(ValueError, match="without a header takes 0-based positions"):
        load_interactions(path)
    got = load_interactions(path, **parse_columns("item=0,user=1,time=3"))
    assert (got.users.tolist(), got.items.tolist(), got.timestamps.tolist()) == (
        ["A39HTATAQ9V7YF", "A3JM6GV9MNOF9X"], ["0205616461", "0558925278"], [1_369_699_200, 1_355_443_200])
    assert load_interactions(path, user_col="1", item_col="0").timestamps is None
    path.write_text("0205616461,A39HTATAQ9V7YF,5.0,1369699200\n0558925278,A3JM6GV9MNOF9X,3.0\n")
    with pytest.raises(ValueError, match="line 2: expected 4 fields, got 3"):
        load_interactions(path, user_col="1", item_col="0", time_col="3")


def test_tab_separated_files_with_and_without_a_header(tmp_path):
    # Gowalla's check-ins: user, ISO time, latitude, longitude, location id; no header.
    gowalla = tmp_path / "loc-gowalla_totalCheckins.txt"
    gowalla.write_text("0\t2010-10-19T23:55:27Z\t30.23\t-97.79\t22847\n0\t2010-10-18T22:17:43Z\t30.26\t-97.75\t420315\n")
    with pytest.raises(ValueError, match="cannot detect the format"):  # five tab-separated fields: not told
        load_interactions(gowalla)
    got = load_interactions(gowalla, fmt="tsv", **parse_columns("user=0,item=4,time=1"))
    assert (got.users.tolist(), got.items.tolist(), got.timestamps.tolist()) == (
        ["0", "0"], ["22847", "420315"], [1_287_532_527, 1_287_440_263])
    headed = tmp_path / "events.tsv"
    headed.write_text("user_id\titem_id\ttimestamp\nu\ta,b\t1700000000000\n")  # a comma inside a field
    assert detect_format(headed) == "tsv"
    got = load_interactions(headed)
    assert (got.users.tolist(), got.items.tolist(), got.timestamps.tolist()) == (["u"], ["a,b"], [1_700_000_000])
    headed.write_text("user_id\titem_id\ttimestamp\nu\ta\t1\nu\tb\n")
    with pytest.raises(ValueError, match="line 3: expected 3 fields, got 2"):
        load_interactions(headed)


def test_epoch_times_in_milli_micro_and_nanoseconds_are_read_as_seconds(tmp_path):
    second = 1_600_000_000
    path = tmp_path / "events.csv"
    for scale in (1, 1_000, 1_000_000, 1_000_000_000):
        path.write_text(f"user_id,item_id,timestamp\n1,a,{second * scale + scale - 1}\n1,b,{(second + 60) * scale}\n")
        assert load_interactions(path).timestamps.tolist() == [second, second + 60], scale
    path.write_text(f"user_id,item_id,timestamp\n1,a,{second * 1000 + 999.5}\n")  # float milliseconds
    assert load_interactions(path).timestamps.tolist() == [second]
    path.write_text("user_id,item_id,timestamp\n1,a,3\n1,b,99999999999\n")  # small ones stay seconds
    assert load_interactions(path).timestamps.tolist() == [3, 99_999_999_999]


def test_json_lines_parse_only_the_id_and_time_keys(tmp_path):
    # Other keys may hold anything (nested, changing types): they are skipped, not parsed.
    records = [dict(user_id=7, item_id="a", ts="2021-01-01T00:00:00Z", text="x" * 50, extra=[1, {"b": 2}]),
               dict(user_id=8, item_id="b", ts="2021-01-01T00:01:00Z", text=None, extra="now a string"),
               dict(user_id=7, item_id="c", ts="2021-01-01T00:02:00Z")]
    got = load_interactions(_json_lines(tmp_path / "log.jsonl", records))
    assert (got.users.tolist(), got.items.tolist()) == (["7", "8", "7"], ["a", "b", "c"])
    assert got.timestamps.tolist() == [1_609_459_200, 1_609_459_260, 1_609_459_320]
    path = _json_lines(tmp_path / "gap.jsonl", [dict(user_id=1, item_id="a"), dict(item_id="b")])
    with pytest.raises(ValueError, match="line 2: missing 'user_id'"):
        load_interactions(path)
    path = _json_lines(tmp_path / "nested.jsonl", [dict(user_id={"id": 1}, item_id="a")])
    with pytest.raises(ValueError, match="'user_id' is .*not a string or a number"):
        load_interactions(path)


def test_bad_json_lines_name_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"user_id": 1, "item_id": 2}\n{"user_id": 1, "item_id": \n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        load_interactions(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        load_interactions(path, fmt="jsonl")
    path.write_text('{"who": 1, "item_id": 2}\n')
    with pytest.raises(ValueError, match="cannot find a user column"):
        load_interactions(path)


def test_column_mappings_parse_and_reach_the_loader(tmp_path):
    from persrec.models.experiment import load_dataset

    assert parse_columns("user=reviewerID, item=asin,time=unixReviewTime") == dict(
        user_col="reviewerID", item_col="asin", time_col="unixReviewTime")
    assert parse_columns(None) == parse_columns("") == {}
    for bad in ("user", "who=x", "user=", "user=a,user=b"):
        with pytest.raises(ValueError, match="column mapping"):
            parse_columns(bad)
    path = tmp_path / "log.csv"
    path.write_text("who,what,when\nu,a,1\nu,b,2\nu,c,3\n")
    data = load_dataset(path, columns=parse_columns("user=who,item=what,time=when"))
    assert data.id_map.decode(data.sequences.items[0]) == ["a", "b", "c"]


def test_persrec_train_and_evaluate_take_a_column_mapping_and_a_k_core(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from persrec.cli import app

    monkeypatch.setenv("PERSREC_WORK_DIR", str(tmp_path / "var"))
    rng = np.random.default_rng(0)
    records = [dict(reviewerID=f"u{u}", asin=f"i{rng.integers(30)}", unixReviewTime=1_500_000_000 + 60 * k)
               for u in range(20) for k in range(12)]
    path = _json_lines(tmp_path / "reviews.jsonl", [{"reviewer": r["reviewerID"], "product": r["asin"],
                                                     "when": r["unixReviewTime"]} for r in records])
    run = lambda *extra: CliRunner().invoke(app, ["train", str(path), "--epochs", "1", "--dim", "8", "--head-dim", "8",  # noqa: E731
                                                  "--max-len", "10", "--out", str(tmp_path / "m"), "--threads", "1", *extra])
    missing = run()
    assert missing.exit_code != 0 and "cannot find a user column" in str(missing.exception)
    bad = run("--columns", "reviewer")
    assert bad.exit_code != 0 and "--columns" in bad.output
    good = run("--columns", "user=reviewer,item=product,time=when", "--k-core", "5")
    assert good.exit_code == 0, good.output
    report = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert report["k_core"] == 5
    kept = k_core(load_interactions(path, user_col="reviewer", item_col="product", time_col="when"), 5)
    assert report["test"]["count"] == len(set(kept.users.tolist()))  # one test row per user of the core
    evaluated = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m" / "best.pt"), str(path), "--k-core", "5",
                                         "--columns", "user=reviewer,item=product,time=when",
                                         "--out", str(tmp_path / "eval.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == report["test"]


def test_k_core_cuts_until_every_user_and_item_has_k_events():
    # k = 2: u4 and item c go in the first cut; that leaves u3 with one event, so the second cut
    # takes u3's other one; then every user and item has two.
    log = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u3", "c"), ("u2", "b"), ("u3", "a"), ("u4", "d")]
    inter = Interactions(*zip(*log), np.arange(len(log)) * 10)
    core = k_core(inter, 2)
    assert list(zip(core.users.tolist(), core.items.tolist())) == [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]
    assert core.timestamps.tolist() == [0, 10, 20, 40]  # file order and times kept
    assert k_core(core, 2).users.tolist() == core.users.tolist()  # a core is its own core
    assert k_core(inter, 1) is inter and k_core(inter, 0) is inter
    with pytest.raises(ValueError, match="no interaction is left in the 3-core"):
        k_core(inter, 3)
    untimed = k_core(Interactions(*zip(*log)), 2)
    assert untimed.timestamps is None and len(untimed) == 4


def test_undetectable_format_lists_the_accepted_formats(tmp_path):
    path = tmp_path / "three.txt"
    path.write_text("1 10 5\n2 11 4\n")
    with pytest.raises(ValueError, match="cannot detect the format") as error:
        load_interactions(path)
    message = str(error.value)
    for fmt in ("ml1m-seq", "movielens-100k", "grouplens-dat", "csv", "tsv", "parquet", "jsonl"):
        assert repr(fmt) in message
    assert "'auto'" not in message


# ---------------------------------------------------------------------------- IdMap


def test_id_map_encode_decode_unknown():
    id_map = IdMap.from_items(["c", "a", "c", "b", "a"])
    assert id_map.items.tolist() == ["c", "a", "b"]
    assert id_map.num_items == len(id_map) == 3
    np.testing.assert_array_equal(id_map.encode([["a", "b"], ["c", "c"]]), [[2, 3], [1, 1]])
    assert id_map.encode(["a", "zz"], unknown=0).tolist() == [2, 0]
    assert id_map.encode(["zz"], unknown=-1).tolist() == [-1]
    with pytest.raises(KeyError, match="zz"):
        id_map.encode(["a", "zz"])
    assert id_map.decode([3, 1]) == ["b", "c"]
    with pytest.raises(KeyError):
        id_map.decode([0])
    assert "a" in id_map and "zz" not in id_map
    assert IdMap.from_items([1193, 661]).encode(["661"]).tolist() == [2]  # non-str ids via str()
    with pytest.raises(ValueError, match="duplicate"):
        IdMap(["a", "a"])
    assert IdMap([]).encode(["a"], unknown=0).tolist() == [0]


def test_id_map_save_load_and_fingerprint(tmp_path):
    id_map = IdMap.from_items(["1193", "661", "914", "Amélie"])
    path = tmp_path / "id_map.json"
    id_map.save(path)
    loaded = IdMap.load(path)
    assert loaded == id_map
    assert loaded.fingerprint() == id_map.fingerprint()
    assert IdMap.from_json(id_map.to_json()) == id_map
    # Stable across processes (no hash randomisation or dict-order effects) ...
    code = (
        "from persrec.models.data import IdMap; "
        "print(IdMap(['1193', '661', '914', 'Amélie']).fingerprint())"
    )
    other_run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert other_run.stdout.strip() == id_map.fingerprint()
    # ... and different for a different map, order included.
    assert IdMap(["661", "1193", "914", "Amélie"]).fingerprint() != id_map.fingerprint()
    assert IdMap(["1193", "661", "914"]).fingerprint() != id_map.fingerprint()
    with pytest.raises(ValueError, match="not an IdMap"):
        IdMap.from_json('{"items": []}')


def test_build_sequences_with_given_map():
    interactions = Interactions(np.array(["u", "u"]), np.array(["a", "b"]))
    id_map = IdMap(["b", "a"])
    seqs, same = build_sequences(interactions, id_map)
    assert same is id_map and seqs.items[0].tolist() == [2, 1]
    with pytest.raises(KeyError):
        build_sequences(Interactions(np.array(["u"]), np.array(["c"])), id_map)


# ---------------------------------------------------------------------------- split and synthetic


def test_leave_one_out_short_users_stay_in_train():
    seqs = SequenceData(
        user_ids=["a", "b", "c"],
        items=[np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9])],
        timestamps=[np.array([1, 2, 3, 4]), np.array([1, 2]), np.array([5, 6, 7])],
    )
    split = leave_one_out(seqs)
    assert [s.tolist() for s in split.train.items] == [[1, 2], [5, 6], [7]]
    assert [t.tolist() for t in split.train.timestamps] == [[1, 2], [1, 2], [5]]
    assert split.valid.user_index.tolist() == split.test.user_index.tolist() == [0, 2]
    assert [h.tolist() for h in split.valid.history] == [[1, 2], [7]]
    assert split.valid.target.tolist() == [3, 8]
    assert [h.tolist() for h in split.test.history] == [[1, 2, 3], [7, 8]]
    assert split.test.target.tolist() == [4, 9]
    assert split.test.target_ts.tolist() == [4, 7]
    assert [h.tolist() for h in split.test.history_ts] == [[1, 2, 3], [5, 6]]


def test_dormant_interest_tastes_return_only_after_the_wandering():
    """Fixed lengths lay each user out as: wander 7, taste 3, wander 7, taste 3, wander 7, one
    taste item (the test target). The seven taste items are new to the taste phases and share
    one cluster; each phase follows a week away; the validation target is a wandering step."""
    a = dormant_interest_interactions(num_users=50, num_items=400, phases=2, wander=(7, 7), taste_len=3, seed=5)
    b = dormant_interest_interactions(num_users=50, num_items=400, phases=2, wander=(7, 7), taste_len=3, seed=5)
    np.testing.assert_array_equal(a.items, b.items)
    seqs, _ = build_sequences(a)
    assert seqs.lengths().tolist() == [28] * 50
    per_cluster = 400 // (math.isqrt(400) // 2)  # _Wander: isqrt(I) // 2 contiguous clusters
    users = np.unique(a.users, return_index=True)[1]
    for start in users:
        raw = np.array([int(i[1:]) for i in a.items[start : start + 28]])
        taste = raw[[7, 8, 9, 17, 18, 19, 27]]
        assert len(set(taste.tolist())) == 7
        assert len(set((taste // per_cluster).tolist())) == 1
        gaps = np.diff(a.timestamps[start : start + 28])  # gaps[i]: before event i + 1
        assert (gaps[[6, 16, 26]] >= 7 * 86400).all()  # a week away before each taste phase
        assert (np.delete(gaps, [6, 16, 26]) < 86400).all()
    with pytest.raises(ValueError, match="clusters of more than"):
        dormant_interest_interactions(num_items=100, phases=4, taste_len=5)


def test_recurring_taste_set_puts_each_taste_item_beyond_a_recent_part_of_19():
    """The generated control of the lifelong memory: every user takes one taste item after a
    week away every 25-55 events, ten times, and the test target is the eleventh; so the taste
    item before a target is 26-56 events back, beyond a PerSRec recent part of 10-19 items."""
    from persrec.models import experiment

    data = experiment.load_dataset("synthetic-recurring")
    assert len(data.sequences.items) == 600
    for items, ts in zip(data.sequences.items[:100], data.sequences.timestamps[:100]):
        returns = np.flatnonzero(np.diff(ts) >= 7 * 86400) + 1  # the taste items' positions
        assert len(returns) == 11 and returns[-1] == len(items) - 1
        assert (np.diff(returns) >= 26).all() and (np.diff(returns) <= 56).all()
        raw = np.array([int(i[1:]) for i in data.id_map.decode(items[returns])])  # "i<k>"
        assert len(set((raw * 22 // 2000).tolist())) == 1  # one of _Wander's 22 clusters


@pytest.mark.parametrize("noise", ["wander", "uniform"])
def test_steady_taste_shows_in_a_long_history_and_the_target_is_new(noise: str):
    """The steady-taste sets: the test target (each user's last event) is new to them and of the
    cluster their whole history visits most; their last 15 events name that cluster far less often."""
    a = steady_taste_interactions(num_users=200, num_items=2000, length=(300, 400), noise=noise, seed=3)
    b = steady_taste_interactions(num_users=200, num_items=2000, length=(300, 400), noise=noise, seed=3)
    np.testing.assert_array_equal(a.items, b.items)
    starts = np.sort(np.unique(a.users, return_index=True)[1])  # events come user by user
    ends = np.append(starts[1:], len(a.items))
    whole = recent = 0
    for lo, hi in zip(starts, ends):
        raw = np.array([int(i[1:]) for i in a.items[lo:hi]])
        assert 300 <= len(raw) <= 400 and raw[-1] not in raw[:-1]
        cluster = raw * 22 // 2000  # _Wander's 22 contiguous clusters
        whole += np.bincount(cluster[:-1], minlength=22).argmax() == cluster[-1]
        recent += np.bincount(cluster[-16:-1], minlength=22).argmax() == cluster[-1]
    assert whole >= 190 and recent <= 120, (whole, recent)
    with pytest.raises(ValueError, match="rate"):
        steady_taste_interactions(rate=0.0)
    with pytest.raises(ValueError, match="noise"):
        steady_taste_interactions(noise="pink")


def test_synthetic_interactions_are_learnable_and_deterministic():
    a = synthetic_interactions(num_users=200, num_items=100, mean_len=30, seed=3)
    b = synthetic_interactions(num_users=200, num_items=100, mean_len=30, seed=3)
    np.testing.assert_array_equal(a.items, b.items)
    seqs, id_map = build_sequences(a)
    assert len(seqs) == 200 and id_map.num_items <= 100
    assert seqs.lengths().min() >= 3
    assert abs(seqs.lengths().mean() - 30) < 3
    assert all(np.all(np.diff(t) > 0) for t in seqs.timestamps)
    # The most frequent successor of an item predicts the next item far better than the most
    # popular item does: the structure a sequential model should find.
    prev = np.concatenate([s[:-1] for s in seqs.items])
    nxt = np.concatenate([s[1:] for s in seqs.items])
    pairs = np.unique(np.stack([prev, nxt]), axis=1, return_counts=True)
    best_next = {}
    for (p, n), c in zip(pairs[0].T.tolist(), pairs[1].tolist(), strict=True):
        if c > best_next.get(p, (0, None))[0]:
            best_next[p] = (c, n)
    markov_acc = np.mean(
        [best_next[p][1] == n for p, n in zip(prev.tolist(), nxt.tolist(), strict=True)]
    )
    popular_acc = np.mean(nxt == np.bincount(nxt).argmax())
    assert markov_acc > 0.5
    assert popular_acc < 0.1


def test_popularity_metrics_on_an_ml1m_slice_equal_a_direct_count(ml1m):
    """The evaluation protocol on real rows: ranks over all items, history excluded, computed
    here one user at a time with numpy, equal what the batched metric code reports."""
    from persrec.models.evaluate import popularity_metrics

    _, seqs, id_map = ml1m
    split = leave_one_out(seqs)
    counts = np.bincount(np.concatenate(split.train.items), minlength=id_map.num_items + 1)
    n = 300
    rows = split.test
    hits10 = ndcg10 = rr = 0.0
    for history, target in zip(rows.history[:n], rows.target[:n]):
        seen = np.zeros(id_map.num_items + 1, bool)
        seen[history] = True
        seen[0] = True
        seen[target] = False  # the target stays rankable
        rank = int(np.count_nonzero((counts > counts[target]) & ~seen))  # ties count in its favour
        hits10 += rank < 10
        ndcg10 += 1 / np.log2(rank + 2) if rank < 10 else 0.0
        rr += 1 / (rank + 1)

    class Rows:
        history, target = rows.history[:n], rows.target[:n]

    got = popularity_metrics(split.train.items, id_map.num_items, Rows)
    assert got["hr@10"] == pytest.approx(hits10 / n, abs=1e-9)
    assert got["ndcg@10"] == pytest.approx(ndcg10 / n, abs=1e-6)
    assert got["mrr"] == pytest.approx(rr / n, abs=1e-6)
