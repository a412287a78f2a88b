#!/usr/bin/env bash
# The peer race on the device: this project's Engine vs gpt-fast (the device's
# peers/side_by_side.py, carried as .device/peers), then bench/plot_race.py's summary, markdown
# table and plot, all under $OUT. Run from the repository root after the project is installed
# (as bench/run_device.sh installs it: the bundle on PYTHONPATH, pip install --no-deps .):
#   bash bench/race_gpu.sh [PART...]      PART: ours gptfast gptfast64 oursamp (default: all four)
# The parts take about 2 + 3 + 3 + 2 minutes: more than one 10-minute call. The harness adds its
# figures to one JSON, kept at $SBS (default /root/race/sbs.json, which survives between calls
# while the machine stays warm), so split the parts over calls, e.g.
#   bash bench/race_gpu.sh ours gptfast      then      bash bench/race_gpu.sh gptfast64 oursamp
# Each call copies the JSON so far to $OUT/sbs.json and summarises it. RACE_FRESH=1 starts over.
set -uo pipefail
OUT=${OUT:-/tmp/race_out}
SBS=${SBS:-/root/race/sbs.json}
REPO=$PWD
HARNESS=$REPO/.device/peers/side_by_side.py
if [ $# -gt 0 ]; then parts=("$@"); else parts=(ours gptfast gptfast64 oursamp); fi
if [ ! -f "$HARNESS" ]; then
  echo "no peer harness at $HARNESS (once per checkout: cp -r ../shared/device/peers .device/)" >&2
  exit 2
fi
mkdir -p "$OUT" "$(dirname "$SBS")"
[ "${RACE_FRESH:-0}" = 1 ] && rm -f "$SBS"
export PYTHONUNBUFFERED=1
cd /tmp  # import the installed package, not the checkout (never run Python from the root)
if ! python3 -c "import layerzero_serve" 2>/dev/null; then
  echo "layerzero_serve is not importable: install the project first (see bench/run_device.sh)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
status=0
for part in "${parts[@]}"; do
  echo "== $part ($(date +%T))"
  t0=$SECONDS
  python3 "$HARNESS" "$part" "$SBS" > "$OUT/sbs_$part.log" 2>&1
  rc=$?
  grep -v "^INFO" "$OUT/sbs_$part.log" | tail -n 15
  echo "== $part: rc $rc, $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && status=$rc
done
if [ -f "$SBS" ]; then
  cp "$SBS" "$OUT/sbs.json"
  python3 "$REPO/bench/plot_race.py" "$OUT/sbs.json" "$OUT" || status=$?
else
  echo "no $SBS written" >&2
  status=1
fi
exit $status
