"""python -m experiments.multimodal [flags]: the same run as python bench.py multimodal [flags]."""
from experiments import common
from experiments.multimodal import run

if __name__ == "__main__":
    common.main(run)
