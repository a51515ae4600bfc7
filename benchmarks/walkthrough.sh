#!/bin/bash
# The README's "Five minutes with kdkit" and the three examples of docs/own-models.md, timed command by command
# in a fresh clone (issue 19). Run it on an otherwise idle machine:
#   bash benchmarks/walkthrough.sh /tmp/kdkit-walkthrough      # clones this checkout's HEAD there
set -e
src=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/tmp/kdkit-walkthrough}
[ -d "$dest/.git" ] || git clone -q "$src" "$dest"
cd "$dest" && git fetch -q "$src" HEAD && git checkout -q --detach FETCH_HEAD && git clean -xfdq -e .venv
[ -d .venv ] || make venv > /dev/null
source .venv/bin/activate
echo "commit $(git log --oneline -1)"
step() {
  local s e
  s=$(date +%s.%N); "$@" > walkthrough-step.log 2>&1; e=$(date +%s.%N)
  printf "%-70s %6.1f s\n" "$*" "$(echo "$e - $s" | bc)"; tail -n 1 walkthrough-step.log | cut -c1-200
}
t0=$(date +%s.%N)
step kdkit models
step kdkit train configs/digits/teacher_lenet5.yaml
step kdkit distill configs/digits/kd.yaml
step kdkit eval --checkpoint runs/digits/kd_lenet5_half/model.pt
step kdkit report runs/digits/teacher_lenet5 runs/digits/kd_lenet5_half
step kdkit export runs/digits/kd_lenet5_half
printf "walkthrough total %.1f s\n" "$(echo "$(date +%s.%N) - $t0" | bc)"
step python examples/distill_your_own_models.py
step python examples/fewshot_grafting.py --shots 5
step python examples/datafree_your_teacher.py
