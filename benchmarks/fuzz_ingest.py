"""Long run of the ingest property test (tests/test_ingest_property.py): N generated AnnData files
(h5ad / zarr, modern and pre-0.7, random shapes, dtypes, layouts, bad values, duplicate barcodes and
genes, odd obs columns) ingested into one store. Every example must be an exact round trip or a
one-line refusal that leaves the store byte-identical; the script prints each distinct outcome
with its count, and exits 1 on the first violation (hypothesis shrinks it first).

    python benchmarks/fuzz_ingest.py --examples 300
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from atlasmix.store import Store  # noqa: E402
from tests.test_ingest_property import anndata_files, check_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    outcomes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    ids = itertools.count()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(str(Path(tmp) / "store"))

        @settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=anndata_files())
        def run(case):
            out = check_case(case, store, Path(tmp), f"d{next(ids)}")
            key = re.sub(r"\bd\d+\b", "<id>", re.sub(r"/\S+", "<path>", out))
            key = re.sub(r"\d[\d,.]*", "N", key)
            outcomes[key] += 1
            kinds[(case["fmt"], case["bad"], "ok" if out == "ok" else "refused")] += 1

        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    print(f"{sum(outcomes.values())} examples in {wall:.0f} s; outcomes:")
    for k, n in outcomes.most_common():
        print(f"{n:6d}  {k}")
    print("\nformat        bad value   outcome   count")
    for (fmt, bad, o), n in sorted(kinds.items()):
        print(f"{fmt:13s} {bad:11s} {o:9s} {n:5d}")


if __name__ == "__main__":
    main()
