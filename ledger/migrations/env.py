from common.migrate import run_env
from ledger.models import metadata

run_env(metadata)
