"""UA-MT (Yu et al., MICCAI 2019) on LA: V-Net mean teacher with uncertainty-aware consistency.

From code/:  python train_LA_uamt.py [--flags]   (-h lists them)
From the repository root:  python code/train_LA_uamt.py [--flags]   (the same default paths)
Settings below are the defaults of the official UA-MT train_LA.py; flags override them.
"""
from training.run import run_script

EXP = "LA/UAMT"
LABELED_NUM = 16
SPECIALIST = "uamt"
GENERALIST_TERM = "none"

SETTINGS = dict(exp=EXP, labeled_num=LABELED_NUM, specialist=SPECIALIST, generalist_term=GENERALIST_TERM)

if __name__ == "__main__":
    run_script(SETTINGS)
