# Sourced by the other scripts: the project's venv first on PATH, FLWR_HOME in the project cache
# (as fedunlearn.environment.prepare_environment does), telemetry and update checks off.
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$PROJECT_ROOT/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PROJECT_ROOT/.cache/flwr-home}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
