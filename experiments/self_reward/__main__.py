"""python -m experiments.self_reward [flags]: the same run as python bench.py self_reward [flags]."""
from experiments import common
from experiments.self_reward import run

if __name__ == "__main__":
    common.main(run)
