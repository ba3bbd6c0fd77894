"""python -m experiments.switch [flags]: the same run as python bench.py switch [flags]."""
from experiments import common
from experiments.switch import run

if __name__ == "__main__":
    common.main(run)
