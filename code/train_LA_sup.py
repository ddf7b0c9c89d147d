"""Supervised baseline on LA: V-Net trained on the labeled cases only (CE + Dice, UA-MT's schedule).

Each batch holds LABELED_BS labeled patches (the same number as in the semi-supervised runs); the unlabeled
rows of the sampler are never loaded nor seen by the network, BatchNorm statistics included.
From code/:  python train_LA_sup.py [--flags]   (-h lists them)
From the repository root:  python code/train_LA_sup.py [--flags]   (the same default paths)
"""
from training.run import run_script

EXP = "LA/Supervised"
LABELED_NUM = 16
SPECIALIST = "none"
GENERALIST_TERM = "none"

SETTINGS = dict(exp=EXP, labeled_num=LABELED_NUM, specialist=SPECIALIST, generalist_term=GENERALIST_TERM)

if __name__ == "__main__":
    run_script(SETTINGS)
