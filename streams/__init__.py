"""The streaming side of modelwatch: worker, command line, sinks, dashboards."""

import os

# The detectors multiply small matrices (a client's batch by its recent queries): BLAS
# threads only contend for the cores, and under load they took 1.8x the CPU per event
# (BENCHMARKS.md). Set before numpy loads; scale out with worker processes instead.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
# numpy asks for transparent huge pages on arrays of 4 MiB or more; a replay's chunk-sized
# arrays live briefly, and zeroing their huge pages cost ~0.9 s of system time per
# realistic day (BENCHMARKS.md). Alert ids are the same either way.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
