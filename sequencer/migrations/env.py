from common.migrate import run_env
from sequencer.models import metadata

run_env(metadata)
