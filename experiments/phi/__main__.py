"""python -m experiments.phi [flags]: the same run as python bench.py phi [flags]."""
from experiments import common
from experiments.phi import run

if __name__ == "__main__":
    common.main(run)
