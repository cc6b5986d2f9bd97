#!/usr/bin/env bash
# One GPU session's measurements for issues 5, 6 and 19, in as few device calls as possible.
#
# On this (CPU) machine, once per session:
#   mkdir -p .git/info && bash ../shared/tools/gpu-wheels.sh
#   (wheels land in .whl/part1 .. .whl/partN, each small enough to carry in one device call)
# Device calls (the machine keeps /tmp between calls while it stays warm, ~30 s idle):
#   carry [".whl/partK"]: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#                           --upgrade --target /tmp/site .whl/partK/*.whl          (K = 1 .. N)
#   then:                 bash benchmarks/gpu_campaign.sh [all|loader|ldvae|geneformer]
# Results (text tables and JSON) are written under $OUT (the device tool brings them back).
#
# Stages (each under one device call's 10-minute limit; a warm machine reuses the store in $W):
#   loader      bench_loader.py on a 1M-cell simulated store: atlasmix vs tiledbsoma-ml (issue 5)
#   ldvae       bench_ldvae.py: LDVAE from the store vs scvi-tools in memory vs the compute floor (issue 5)
#   hvg         both benches on a 2,000-gene axis, from the store and through the x cache
#               (atlasmix:x_cache=1, atlasmix/training/xcache.py) vs tiledbsoma-ml / scvi in memory (issue 5)
#   geneformer  gene medians of the store -> dictionaries, then bench_tokenizer.py --pretrain: V1
#               pretraining cells/s streamed from the store and the data-wait fraction (issue 6)
#   layout      issue 19's GPU goals, sized for a 15-minute device budget: on an L19_CELLS-cell store
#               (200,000; its own work dir $W/l19), LDVAE end to end with the loader's defaults (the
#               store's x layout) vs scvi-tools on an in-memory AnnData of the same cells (goal >= 2x)
#               vs the module's compute floor (goal >= 0.8), every gene and 2,000 genes, then the
#               loader alone vs tiledbsoma-ml. Not part of "all" (run it on its own): its timeouts
#               (270 + 150 + 120 s) keep it inside one 10-minute device call. Dry-run on 2 CPU cores
#               (DEVICE=cpu L19_CELLS=20000 L19_TRAIN=5000, 2026-12-06): 4 min 47 s, all six outputs.
# Disk: the 1M-cell store and its simulated sources take ~14 GB; an h5 x cache of every gene 8 bytes
# per nonzero (1M cells: ~14 GB, 200k: ~3 GB). x cache builds are reported, not timed as training.
# Environment: NCELLS (store size, 1,000,000), DEVICE (cuda), W (work dir, /tmp/atlasmix_gpu),
# LOADER_METHODS, LDVAE_METHODS, GF_STEPS (200), GF_CELLS (manifest cells, 200,000).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/atlasmix_gpu_out}; mkdir -p "$OUT"
W=${W:-/tmp/atlasmix_gpu}; NCELLS=${NCELLS:-1000000}; DEVICE=${DEVICE:-cuda}
STAGE=${1:-all}
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
python3 -c "import atlasmix.cli, tiledbsoma, scvi, tiledbsoma_ml, torch; print('imports ok', tiledbsoma.__version__, scvi.__version__, torch.__version__)" || exit 3
if [ "$STAGE" = all ] || [ "$STAGE" = loader ]; then
  timeout "${LOADER_T:-540}" python3 benchmarks/bench_loader.py --workdir "$W" --n-cells "$NCELLS" --max-cells "${LOADER_CELLS:-300000}" \
    --io-batch-size 65536 --batch-size 1024 --device "$DEVICE" \
    --methods "${LOADER_METHODS:-atlasmix:io_threads=8,atlasmix:io_threads=12:block_size=256,atlasmix:io_threads=4:x_cache=h5,tiledbsoma_ml}" \
    2>&1 | tee "$OUT/loader.txt"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = ldvae ]; then
  timeout "${LDVAE_T:-540}" python3 benchmarks/bench_ldvae.py --workdir "$W" --n-cells "$NCELLS" --train-cells "${LDVAE_CELLS:-200000}" \
    --epochs 3 --batch-size 1024 --io-threads 8 --methods "${LDVAE_METHODS:-atlasmix,atlasmix:x_cache=h5,scvi_memory,compute_floor}" \
    2>&1 | tee "$OUT/ldvae.txt"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = hvg ]; then
  timeout "${HVG_T:-280}" python3 benchmarks/bench_loader.py --workdir "$W" --n-cells "$NCELLS" --max-cells "${LOADER_CELLS:-300000}" \
    --io-batch-size 65536 --batch-size 1024 --device "$DEVICE" --n-genes 2000 \
    --methods "atlasmix:io_threads=8,atlasmix:io_threads=8:x_cache=1,atlasmix:io_threads=4:x_cache=h5,tiledbsoma_ml" 2>&1 | tee "$OUT/loader_hvg.txt"
  timeout "${HVG_T:-280}" python3 benchmarks/bench_ldvae.py --workdir "$W" --n-cells "$NCELLS" --train-cells "${LDVAE_CELLS:-200000}" \
    --epochs 3 --batch-size 1024 --io-threads 8 --n-genes 2000 \
    --methods "atlasmix,atlasmix:x_cache=1,atlasmix:x_cache=h5,scvi_memory,compute_floor" 2>&1 | tee "$OUT/ldvae_hvg.txt"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = geneformer ]; then
  python3 - "$W" "$NCELLS" "${GF_CELLS:-200000}" <<'PY' || exit 4
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_loader import build_store
from bench_ldvae import make_manifest
w, n, m = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
w.mkdir(parents=True, exist_ok=True)
uri = build_store(w, n)
(w / "gf_manifest").write_text(str(make_manifest(uri, w, m)))
PY
  [ -f "$W/gf_dicts/token_dictionary.pkl" ] || python3 -m atlasmix.cli geneformer medians --store "$W/store" \
    --mixture "$(cat "$W/gf_manifest")" --out "$W/gf_dicts" 2>&1 | tail -3 | tee "$OUT/medians.txt"
  timeout "${GF_T:-540}" python3 benchmarks/bench_tokenizer.py --shared /nonexistent --sim-nnz "" \
    --store "$W/store" --mixture "$(cat "$W/gf_manifest")" --dictionaries "$W/gf_dicts" \
    --pretrain --preset v1 --steps "${GF_STEPS:-200}" --pretrain-batch-size "${GF_BATCH:-12}" --device "$DEVICE" \
    --out "$OUT/geneformer.json" 2>&1 | tee "$OUT/geneformer.txt"
fi
if [ "$STAGE" = layout ]; then
  L19=${L19_W:-$W/l19}; L19N=${L19_CELLS:-200000}; L19T=${L19_TRAIN:-100000}
  for G in 0 2000; do  # the first call also builds the store (2-core dry run, 20,000 cells: 14 s)
    T=270; [ "$G" = 0 ] || T=150
    timeout "${L19_T:-$T}" python3 benchmarks/bench_ldvae.py --workdir "$L19" --n-cells "$L19N" --train-cells "$L19T" \
      --epochs 3 --batch-size 1024 --io-batch-size 16384 --n-genes "$G" \
      --methods "${L19_METHODS:-atlasmix,scvi_memory,compute_floor}" 2>&1 | tee "$OUT/l19_ldvae_g$G.txt"
    cp "$L19/ldvae_results.json" "$OUT/l19_ldvae_g$G.json" 2>/dev/null || true
  done
  timeout "${L19_T:-120}" python3 benchmarks/bench_loader.py --workdir "$L19" --n-cells "$L19N" --max-cells "$L19T" \
    --io-batch-size 16384 --batch-size 1024 --device "$DEVICE" --methods "${L19_LOADER:-atlasmix,tiledbsoma_ml}" \
    2>&1 | tee "$OUT/l19_loader.txt"
  cp "$L19/results.json" "$OUT/l19_loader.json" 2>/dev/null || true
fi
cp "$W"/*.json "$OUT"/ 2>/dev/null || true
