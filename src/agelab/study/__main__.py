"""``python -m agelab.study CONFIG.json PARENT_RUN TAG [MAX_TRIALS]``: one worker process of
``agelab run --workers N`` (started by :func:`agelab.study.run.run_study`)."""

import sys

from agelab.study.worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
