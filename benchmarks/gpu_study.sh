#!/usr/bin/env bash
# The demo study on a GPU machine (issue 17: "say what a GPU run changes"), in one device call.
#
# On this (CPU) machine, once per session: bash ../shared/tools/gpu-wheels.sh (wheels in .whl/partN).
# Device calls on a warm machine: carry [".whl/partK", ...] and install each part into /tmp/site
# (see benchmarks/gpu_campaign.sh), then: bash benchmarks/gpu_study.sh [cpu-defaults|reference|all]
#   cpu-defaults  `atlasmix demo` as shipped (500 HVGs, lr 0.03, 200k cells seen), models on CUDA
#   reference     the same study with scFM-datamix's settings: 2,000 HVGs, lr 5e-3, 1,000,000 cells seen
# Tables and JSON land in $OUT (demo.json, study.json, summary.csv, checks.json per run).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/atlasmix_gpu_out}; mkdir -p "$OUT"
W=${W:-/tmp/atlasmix_gpu_study}; JOBS=${JOBS:-4}
STAGE=${1:-all}
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
python3 -c "import atlasmix.cli, tiledbsoma, scvi, torch; print('imports ok', torch.__version__, torch.cuda.is_available())" || exit 3
keep() {  # copy a run's small outputs into $OUT/<tag>_*
  local tag=$1 d=$2
  cp "$d/demo.json" "$OUT/${tag}_demo.json" 2>/dev/null
  cp "$d/study/study.json" "$OUT/${tag}_study.json" 2>/dev/null
  cp "$d/study/summary.csv" "$OUT/${tag}_summary.csv" 2>/dev/null
}
if [ "$STAGE" = all ] || [ "$STAGE" = cpu-defaults ]; then
  /usr/bin/time -v python3 -m atlasmix.cli demo --workdir "$W/cpu_defaults" --accelerator gpu --jobs "$JOBS" \
    > "$OUT/cpu_defaults.log" 2>&1; echo "cpu-defaults rc=$?"
  tail -25 "$OUT/cpu_defaults.log"; keep cpu_defaults "$W/cpu_defaults"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = reference ]; then
  python3 - "$W/reference" "${REF_JOBS:-8}" > "$OUT/reference.log" 2>&1 <<'PY'
import json, sys, time, tomllib
from pathlib import Path
from atlasmix.demo import demo_study_path
from atlasmix.store import Store
from atlasmix.study.runner import run_study
from atlasmix.study.spec import StudySpec
w, jobs = Path(sys.argv[1]), int(sys.argv[2])
src = Path(sys.argv[1]).parent / "cpu_defaults" / "store"   # the store of the first stage
base = tomllib.loads(demo_study_path().read_text())
base["mixtures_dir"] = str(demo_study_path().parent / base["mixtures_dir"])
base["eval_sets"] = str(demo_study_path().parent / base["eval_sets"])
base.update(budgets=["cells=1000000"], genes={"n_hvg": 2000}, ldvae={"batch_size": 256, "lr": 5e-3}, name="reference")
t = time.perf_counter()
doc = run_study(StudySpec.model_validate(base), Store(str(src)), w / "study", jobs=jobs, accelerator="gpu", log=print)
print("reference study", round(time.perf_counter() - t, 1), "s; all checks passed:", doc["all_checks_passed"])
PY
  echo "reference rc=$?"; tail -15 "$OUT/reference.log"; cp "$W/reference/study/study.json" "$OUT/reference_study.json" 2>/dev/null
  cp "$W/reference/study/summary.csv" "$OUT/reference_summary.csv" 2>/dev/null
fi
ls -la "$OUT"
