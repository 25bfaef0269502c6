"""Stage II: end-to-end fine-tuning with the ranking loss (hard negatives) plus both instance losses.

    python train_stage2.py --config configs/flickr30k_stage2.yaml --data data/flickr30k --out runs/flickr30k/stage2 \\
        --init runs/flickr30k/stage1/checkpoint_last.pt

Multi-GPU: torchrun --nproc_per_node=N train_stage2.py ... (batch_size stays the global batch). See README.
"""
import sys

from engine.train_cli import main  # parses arguments before importing torch and the models

if __name__ == "__main__":
    sys.exit(main(2))
