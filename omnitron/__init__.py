"""Omnitron-X's library: `models/` (one file per architecture), `kernels/` (attention), and one small
module per method. The commands at the repository root (train.py, sample.py, bench.py) and the
experiments (experiments/NAME/) import from here; nothing here imports them."""
