"""python -m experiments.scaling [flags]: the same run as python bench.py scaling [flags]."""
from experiments import common
from experiments.scaling import run

if __name__ == "__main__":
    common.main(run)
