"""python -m experiments.performer [flags]: the same run as python bench.py performer [flags]."""
from experiments import common
from experiments.performer import run

if __name__ == "__main__":
    common.main(run)
