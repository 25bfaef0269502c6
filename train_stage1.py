"""Stage I: frozen image backbone, instance loss of both paths through the shared classifier W.

    python train_stage1.py --config configs/flickr30k_stage1.yaml --data data/flickr30k --out runs/flickr30k/stage1

Multi-GPU: torchrun --nproc_per_node=N train_stage1.py ... (batch_size stays the global batch). See README.
"""
import sys

from engine.train_cli import main  # parses arguments before importing torch and the models

if __name__ == "__main__":
    sys.exit(main(1))
