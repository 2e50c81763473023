#!/usr/bin/env bash
# The README's first command on a cold start: a fresh clone of HEAD, a fresh venv, an empty torch hub
# cache (so the ImageNet weights are fetched too), then `dvc repro` on the embedded default, then a rerun
# that must do nothing. Prints the three times and the test-split result; leaves nothing in the repo.
#
#   bash bench/cold_repro.sh [workdir]     (default: a new folder under ${TMPDIR:-/tmp}; needs network for pip)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/cold-repro.XXXXXX")}"
mkdir -p "$work"
git clone -q "$repo" "$work/clone"
cd "$work/clone"
python3 -m venv .venv
. .venv/bin/activate
export TORCH_HOME="$work/torch-home"  # empty: extract fetches the weights

seconds() { local log="$work/$1.log" start=$SECONDS; shift; "$@" > "$log" 2>&1; echo $((SECONDS - start)); }
install=$(seconds install pip install -e .)
repro=$(seconds repro dvc repro)
rerun=$(seconds rerun dvc repro)

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git rev-parse --short HEAD)"
echo "pip install -e .    ${install} s"
echo "dvc repro (cold)    ${repro} s   (weights fetched: $(ls "$TORCH_HOME"/hub/checkpoints/))"
echo "dvc repro (rerun)   ${rerun} s"
python -c "import json; m = json.load(open('metrics/eval.json')); a = m['attention']; \
print(f\"test video accuracy {m['video_accuracy']:.1%} (chance {m['chance']:.1%}); \
attention mass in box {a['mass_in_box']:.4f} vs uniform {a['mass_in_box_uniform']:.4f} (x{a['mass_ratio']:.2f})\")"
echo "logs and the clone: $work"
