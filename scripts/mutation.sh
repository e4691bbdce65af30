#!/usr/bin/env bash
# Mutation testing of the core rules with mutmut (slow: not in CI). docs/testing.md has the last score.
#
#   bash scripts/mutation.sh [GROUP ...]      groups: free loop hash reward window redact shards grade
#                                             benchmarks runner (default: all)
#
# Each group mutates one set of functions and runs only the fast tests that guard them; mutmut then
# runs, per mutant, just the tests that call the mutated function. Work happens in a copy of the
# working tree (MUTATION_DIR, default a new temp dir) so the worktree gets no mutants/ directory.
# Environment: MUTATION_MINUTES caps each group's run (default 15), MUTATION_CHILDREN the workers (2).
# The trainer is left out while it is being rewritten; its accumulation rule has its own behaviour
# test (tests/training/test_grad_accumulation.py).
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
MUTMUT_VERSION=3.8.1
MINUTES="${MUTATION_MINUTES:-15}"
CHILDREN="${MUTATION_CHILDREN:-2}"
WORK="${MUTATION_DIR:-$(mktemp -d /tmp/freelm-mutation.XXXXXX)}"

[ -x "$PY" ] || { echo "no $PY: run bash scripts/setup.sh first" >&2; exit 2; }
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null)" != "$MUTMUT_VERSION" ]; then
    "$PY" -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
export OMP_NUM_THREADS=1

# group -> "files to mutate|mutant-name globs (functions in scope)|test files[|mutmut setting]"
# Groups whose tests start worker processes (the grader's multiprocessing forkserver) or keep state in
# a module across runs run each mutant from mutmut's own fork server: its default forks every mutant
# from the process that ran the clean tests, where such a pool cannot start again.
declare -A GROUPS_SPEC=(
    [free]="freelm/free.py freelm/evaluation/extract.py freelm/evaluation/passk.py|freelm.free.* freelm.evaluation.extract.* freelm.evaluation.passk.*|tests/core/test_free_apply.py tests/core/test_free_parse.py tests/core/test_free_bounds.py tests/evaluation/test_extract.py tests/evaluation/test_passk.py"
    [loop]="freelm/loop.py freelm/schedule.py|freelm.loop.* freelm.schedule.*|tests/loop/test_loop.py tests/loop/test_loop_cleaning.py tests/loop/test_loop_records.py tests/loop/test_schedule.py"
    [hash]="freelm/run/settings.py freelm/run/spec.py|freelm.run.settings.* freelm.run.spec.*|tests/run/test_settings_hash.py tests/run/test_runner.py tests/run/test_runner_shards.py tests/backends/test_backends_registry.py tests/cleaners/test_cleaners_registry.py"
    [reward]="freelm/training/reward.py freelm/training/synth.py|freelm.training.reward.xǁRewardFilterǁ* freelm.training.synth.xǁSynthesizerǁdecide__mutmut_*|tests/training/test_reward_filter.py tests/training/test_synth.py"
    [window]="freelm/backends/base.py|freelm.backends.base.xǁContextWindowǁ* freelm.backends.base.x_refused__mutmut_* freelm.backends.base.x_says_window_exceeded__mutmut_*|tests/backends/test_window_edge.py tests/loop/test_loop.py tests/backends/test_backend_sglang.py tests/backends/test_backend_openai.py tests/backends/test_backend_vllm.py"
    [redact]="freelm/redact.py|freelm.redact.*|tests/core/test_redaction.py"
    [shards]="freelm/shards.py|freelm.shards.*|tests/run/test_runner_shards.py tests/evaluation/test_viewer.py"
    [grade]="freelm/evaluation/grade.py|freelm.evaluation.grade.x_normalize_answer__mutmut_* freelm.evaluation.grade.x_quick_grade__mutmut_* freelm.evaluation.grade.x_grade_pairs__mutmut_*|tests/evaluation/test_grading_bounds.py tests/evaluation/test_grade.py::test_normalize_and_quick_path tests/evaluation/test_grade.py::test_dedup_grades_each_distinct_pair_once tests/evaluation/test_grade.py::test_golden tests/evaluation/test_grade.py::test_spellings_of_one_answer_normalize_alike_so_they_vote_together|process_isolation = forkserver"
    [benchmarks]="freelm/benchmarks/sources.py|freelm.benchmarks.sources.*|tests/data/test_benchmarks.py|process_isolation = forkserver"
    [runner]="freelm/run/plan.py freelm/run/batch.py|freelm.run.plan.x_inspect_output__mutmut_* freelm.run.plan.x_move_aside__mutmut_* freelm.run.plan.x_plan_jobs__mutmut_* freelm.run.batch.x__execute__mutmut_* freelm.run.batch.x__append_finished__mutmut_* freelm.run.batch.x__error_entry__mutmut_*|tests/run/test_runner.py tests/backends/test_window_edge.py tests/core/test_free_bounds.py"
)
SELECTED=("$@")
[ ${#SELECTED[@]} -gt 0 ] || SELECTED=(free loop hash reward window redact shards grade benchmarks runner)

list() { printf '%s\n' "$@" | sed 's/^/    /'; }

for group in "${SELECTED[@]}"; do
    spec="${GROUPS_SPEC[$group]:-}"
    [ -n "$spec" ] || { echo "unknown group $group (${!GROUPS_SPEC[*]})" >&2; exit 2; }
    IFS='|' read -r files names tests setting <<<"$spec"
    dir="$WORK/$group"
    mkdir -p "$dir"
    # the working tree as it is (tracked and new files), without ignored ones
    (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$dir"
    # shellcheck disable=SC2086
    {
        echo "[mutmut]"
        echo "source_paths = freelm"
        echo "only_mutate ="; list $files
        echo "pytest_add_cli_args_test_selection ="; list $tests
        echo "also_copy ="; list runner.py eval_passk.py llm_judge.py scripts configs  # for tests that run them
        echo "pytest_add_cli_args ="; list -p no:cacheprovider --hypothesis-seed=0
        [ -z "$setting" ] || echo "$setting"
    } >"$dir/setup.cfg"
    sed -i '/^\[tool.mutmut\]/,$d' "$dir/pyproject.toml"  # setup.cfg is read only without a [tool.mutmut]
    echo "== $group: $files (log: $dir/run.log)"
    started=$SECONDS
    # shellcheck disable=SC2086
    (cd "$dir" && timeout --foreground "${MINUTES}m" "$ROOT/.venv/bin/mutmut" run --max-children "$CHILDREN" $names \
        >run.log 2>&1) || { status=$?; [ $status -eq 124 ] && echo "   the ${MINUTES} min budget ran out: the score counts the mutants tried" \
        || echo "   mutmut failed (status $status): see $dir/run.log"; }
    (cd "$dir" && "$ROOT/.venv/bin/mutmut" results --all true >results.txt 2>/dev/null) || true
    "$PY" - "$dir/results.txt" "$group" "$((SECONDS - started))" <<'EOF'
import collections, sys
path, group, seconds = sys.argv[1:]
status = dict(line.strip().rsplit(": ", 1) for line in open(path) if ": " in line)
counts = collections.Counter(status.values())
tried = sum(n for s, n in counts.items() if s != "not checked")
killed = counts["killed"] + counts["timeout"] + counts["segfault"]
score = f"{100 * killed / tried:.1f}%" if tried else "n/a"
print(f"   {group}: score {score} ({killed} killed of {tried} tried) in {seconds} s; {dict(counts)}")
for name, s in sorted(status.items()):
    if s not in ("killed", "timeout", "segfault", "not checked"):
        print(f"   {s}: {name}")
EOF
done
echo "work dir: $WORK (inspect a survivor: cd $WORK/GROUP && $ROOT/.venv/bin/mutmut show NAME)"
