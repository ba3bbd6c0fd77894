"""python -m experiments.icl [flags]: the same run as python bench.py icl [flags]."""
from experiments import common
from experiments.icl import run

if __name__ == "__main__":
    common.main(run)
