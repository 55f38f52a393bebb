#!/bin/bash
# The TUI in a real terminal: tmux at 160x48 runs `python -m cogsurgeon.inspector [MODEL]`, polls the pane every 50 ms until
# the tree's root row (CogVideoXTransformer3DModel) is on screen, types `/`, `attn1`, Enter, saves the screen,
# presses ctrl+q and reports the exit code. Then the bare imports the model load needs, for comparison.
#
#   bench/tui_terminal.sh [MODEL]                                   # warm inventory cache (the usual start)
#   COGSURGEON_CACHE_DIR=$(mktemp -d) bench/tui_terminal.sh [MODEL] # cold cache: the tree waits for the model
#
#   bench/tui_terminal.sh journeys [--size 80x24]                  # the workflows, by keys, at 80x24 and 160x48:
#                                                                    screens kept in bench/results/tui_terminal/
#
# PYTHON defaults to the interpreter on PATH; the screen after Enter is left in /tmp/cogsurgeon_tui_screen.txt.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${1:-}" = journeys ]; then
  shift
  exec "$PYTHON" bench/tui_terminal_journeys.py --python "$PYTHON" "$@"
fi
SESSION=cogsurgeon-bench
EXIT_FILE=$(mktemp)
rm -f "$EXIT_FILE"
tmux kill-session -t "$SESSION" 2>/dev/null
start=$(date +%s.%N)
tmux new-session -d -s "$SESSION" -x 160 -y 48 \
  "COGSURGEON_CACHE_DIR=${COGSURGEON_CACHE_DIR:-} $PYTHON -m cogsurgeon.inspector ${1:-}; echo \$? > $EXIT_FILE; sleep 30"
until tmux capture-pane -p -t "$SESSION" | grep -q "CogVideoXTransformer3DModel"; do sleep 0.05; done
echo "process start -> tree on screen: $(echo "$(date +%s.%N) - $start" | bc) s"
sleep 0.5
tmux send-keys -t "$SESSION" /; sleep 0.3
tmux send-keys -t "$SESSION" attn1; sleep 0.5
tmux send-keys -t "$SESSION" Enter; sleep 3
tmux capture-pane -p -t "$SESSION" > /tmp/cogsurgeon_tui_screen.txt
echo "details after / attn1 Enter: $(grep -o 'file        [^ ]*' /tmp/cogsurgeon_tui_screen.txt | head -1)"
quit=$(date +%s.%N)
tmux send-keys -t "$SESSION" C-q
for _ in $(seq 300); do [ -s "$EXIT_FILE" ] && break; sleep 0.05; done
echo "ctrl+q -> exit code $(cat "$EXIT_FILE") after $(echo "$(date +%s.%N) - $quit" | bc) s"
tmux kill-session -t "$SESSION"
rm -f "$EXIT_FILE"
/usr/bin/time -f "bare imports (torch, then the CogVideoX class as inspector.loading imports it): %e s" \
  "$PYTHON" -c "import sys; sys.path.insert(0, '.'); import torch; from inspector.loading import transformer_class; transformer_class()"
