"""python -m experiments.positions [flags]: the same run as python bench.py positions [flags]."""
from experiments import common
from experiments.positions import run

if __name__ == "__main__":
    common.main(run)
