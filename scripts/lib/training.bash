# Sourced by the per-model Megatron-Bridge launchers (train_qwen3_*.sh): what they share.

# train_model PRESET NODES ARGS...: train the Free-Module LoRA on PRESET with scripts/train_freelm.sh,
# NNODES defaulting to NODES (the recipe's layout). The run's variables (model_path, train_fp, output_dir,
# run_name, nemo_path, ...) come from the environment; train_freelm.sh names any required one left empty.
train_model() {
  local preset="$1" nodes="$2" launcher
  shift 2
  launcher="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/train_freelm.sh"
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "Usage: [model_path=... [nemo_path=...] train_fp=... output_dir=... run_name=...] $0 [--dry-run] [-- EXTRA_ARGS...]"
    echo "Trains the Free-Module LoRA on $preset (default: $nodes node(s) x 8 GPUs)."
    exec "$launcher" --help
  fi
  export PRESET="$preset"
  export NNODES="${NNODES:-$nodes}"
  exec "$launcher" "$@"
}
