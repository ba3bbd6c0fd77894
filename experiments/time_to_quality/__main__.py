"""python -m experiments.time_to_quality [flags]: the same run as python bench.py time_to_quality [flags]."""
from experiments import common
from experiments.time_to_quality import run

if __name__ == "__main__":
    common.main(run)
