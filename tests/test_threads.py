"""The detectors' small matrix products run on one BLAS thread unless the user says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import streams, numpy, threadpoolctl, json; print(json.dumps("
         "[i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']))")


def blas_threads(**env: str) -> list[int]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_importing_streams_pins_blas_to_one_thread():
    assert blas_threads() and set(blas_threads()) == {1}


def test_a_users_thread_setting_is_kept():
    assert set(blas_threads(OPENBLAS_NUM_THREADS="2")) == {2}
