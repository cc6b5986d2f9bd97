"""Hostile mixture SQL: every query here is refused with one line naming the component, and nothing
runs unbounded. The corpus covers file access, statements, settings, extensions, sampling and
other nondeterminism, huge joins, huge strings and endless recursion."""

from __future__ import annotations

import time

import pytest

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import loads_spec, resolve, write_manifest
from tests.conftest import run_cli, simulated_store

FILE = "refused"            # statement / file access / extension / setting
NONDET = "between runs"     # result changes between runs
TIME = "stopped after"      # wall-clock limit
MEMORY = "memory limit"     # duckdb memory limit

CORPUS = [
    # file access in its forms
    ("sql", "SELECT soma_joinid FROM read_csv('/etc/passwd')", FILE),
    ("sql", "SELECT soma_joinid FROM read_csv_auto('/etc/passwd')", FILE),
    ("sql", "SELECT soma_joinid FROM read_parquet('x.parquet')", FILE),
    ("sql", "SELECT soma_joinid FROM read_json_auto('x.json')", FILE),
    ("sql", "SELECT length(content) AS soma_joinid FROM read_text('/etc/passwd')", FILE),
    ("sql", "SELECT soma_joinid FROM read_blob('/etc/shadow')", FILE),
    ("sql", "SELECT soma_joinid FROM 'x.parquet'", FILE),
    ("sql", "SELECT o.soma_joinid FROM obs o JOIN 's3://bucket/x.parquet' p USING (soma_joinid)", FILE),
    ("sql", "SELECT soma_joinid FROM glob('/etc/*')", FILE),
    ("sql", "SELECT soma_joinid FROM sniff_csv('/etc/passwd')", FILE),
    ("sql", "SELECT soma_joinid FROM parquet_metadata('x.parquet')", FILE),
    ("sql", "SELECT soma_joinid FROM query('SELECT soma_joinid FROM obs USING SAMPLE 10%')", FILE),
    ("where", "soma_joinid IN (SELECT soma_joinid FROM read_csv('/etc/passwd'))", FILE),
    # statements: DDL / DML / several statements
    ("sql", "COPY obs TO '/tmp/obs.csv'", FILE),
    ("sql", "SELECT soma_joinid FROM obs; COPY obs TO '/tmp/x.csv'", FILE),
    ("sql", "EXPORT DATABASE '/tmp/db'", FILE),
    ("sql", "CREATE TABLE t AS SELECT * FROM obs", FILE),
    ("sql", "CREATE MACRO m(x) AS x", FILE),
    ("sql", "DROP VIEW obs", FILE),
    ("sql", "INSERT INTO obs SELECT * FROM obs", FILE),
    ("sql", "UPDATE obs SET qc_pass = true", FILE),
    ("sql", "DELETE FROM obs", FILE),
    ("sql", "ALTER VIEW obs RENAME TO x", FILE),
    ("where", "true) OR (1=1; DROP VIEW obs", FILE),
    # settings, extensions, attach
    ("sql", "SET enable_external_access = true", FILE),
    ("sql", "RESET memory_limit", FILE),
    ("sql", "PRAGMA database_list", FILE),
    ("sql", "INSTALL httpfs", FILE),
    ("sql", "LOAD httpfs", FILE),
    ("sql", "ATTACH '/tmp/x.db' AS x", FILE),
    ("sql", "CALL pragma_version()", FILE),
    # sampling and other nondeterminism
    ("sql", "SELECT soma_joinid FROM obs USING SAMPLE 10%", NONDET),
    ("sql", "SELECT soma_joinid FROM obs USING SAMPLE reservoir(50 ROWS) REPEATABLE (1)", NONDET),
    ("sql", "SELECT soma_joinid FROM obs TABLESAMPLE 10%", NONDET),
    ("sql", "SELECT soma_joinid FROM obs WHERE random() < 0.1", NONDET),
    ("where", "setseed(0.5) IS NULL OR random() < 0.5", NONDET),
    ("where", "hash(uuid()) % 2 = 0", NONDET),
    ("where", "current_date > DATE '2020-01-01'", NONDET),
    ("sql", "SELECT soma_joinid FROM obs LIMIT 100", NONDET),
    ("sql", "SELECT any_value(soma_joinid) AS soma_joinid FROM obs GROUP BY cell_type", NONDET),
    ("sql", "SELECT soma_joinid FROM (SELECT soma_joinid, row_number() OVER () AS r FROM obs) WHERE r < 10", NONDET),
    # huge joins, endless recursion, huge strings
    ("sql", "SELECT a.soma_joinid FROM obs a, obs b, obs c", TIME),
    ("sql", "WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r) "
            "SELECT soma_joinid FROM obs WHERE soma_joinid IN (SELECT i FROM r)", TIME),
    ("sql", "SELECT a.soma_joinid FROM obs a, obs b WHERE length(repeat(a.cell_type, 5000) || b.cell_type) > 0 "
            "ORDER BY repeat(a.cell_type, 5000) || b.cell_type", MEMORY),
    ("where", "length(repeat('x', 10000000000)) > 0", "Out of Range"),
]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    store, _ = simulated_store(d, 3000, sources="blood_a,malignant", seed=2, n_genes=500)
    return store, d


def _spec(key: str, text: str, name: str = "hostile"):
    esc = text.replace("\\", "\\\\").replace('"', '\\"')
    return loads_spec(f'name = "{name}"\nseed = 0\n[[components]]\nname = "evil"\n{key} = "{esc}"\n', f"{name}.toml")


@pytest.mark.parametrize("key,text,expected", CORPUS, ids=[f"{i:02d}-{t[:40]}" for i, (_, t, _) in enumerate(CORPUS)])
def test_hostile_query_is_refused_in_one_line(lake, monkeypatch, key, text, expected):
    # the time limit is short only where it is the limit under test: on a loaded 2-core CI runner the
    # memory case must not lose the race to the clock (it did, at 2 s)
    monkeypatch.setenv("ATLASMIX_SQL_TIMEOUT_S", "2" if expected == TIME else "25")
    monkeypatch.setenv("ATLASMIX_SQL_MEMORY_LIMIT", "100MB")
    store, _ = lake
    t0 = time.perf_counter()
    with pytest.raises(AtlasmixError) as e:
        resolve(_spec(key, text), store)
    msg = str(e.value)
    assert "\n" not in msg and expected in msg, msg
    assert "evil" in msg or "components[0]" in msg or expected == FILE or expected == NONDET, msg
    assert time.perf_counter() - t0 < 30


def test_legitimate_queries_with_keywords_in_literals_resolve_reproducibly(lake, tmp_path):
    store, _ = lake
    texts = [("where", "cell_type <> 'random() USING SAMPLE; DROP' AND qc_pass"),
             ("sql", "SELECT soma_joinid FROM obs WHERE qc_pass ORDER BY soma_joinid LIMIT 200"),
             ("sql", "SELECT soma_joinid FROM (SELECT soma_joinid, row_number() OVER (PARTITION BY cell_type "
                     "ORDER BY soma_joinid) AS r FROM obs) WHERE r <= 20 -- first 20 per type, random() in a comment")]
    for i, (key, text) in enumerate(texts):
        a, b = tmp_path / f"a{i}.parquet", tmp_path / f"b{i}.parquet"
        write_manifest(resolve(_spec(key, text, f"ok{i}"), store), a)
        write_manifest(resolve(_spec(key, text, f"ok{i}"), store), b)
        assert a.read_bytes() == b.read_bytes()
    assert len(resolve(_spec(*texts[1], "ok1"), store).table) == 200


def test_cli_refuses_using_sample_in_one_line(lake, tmp_path):
    store, _ = lake
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\nseed = 0\n[[components]]\nname = "evil"\nsql = "SELECT soma_joinid FROM obs USING SAMPLE 10%"\n')
    r = run_cli("mix", "resolve", spec, "--store", store.uri, "--out", tmp_path / "m.parquet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: refused") and "USING SAMPLE" in r.stderr
    assert not (tmp_path / "m.parquet").exists()
