"""Mean teacher (Tarvainen & Valpola, 2017) on LA with UA-MT's V-Net, schedules and perturbation.

From code/:  python train_LA_mt.py [--flags]   (-h lists them)
From the repository root:  python code/train_LA_mt.py [--flags]   (the same default paths)
"""
from training.run import run_script

EXP = "LA/MT"
LABELED_NUM = 16
SPECIALIST = "mt"
GENERALIST_TERM = "none"

SETTINGS = dict(exp=EXP, labeled_num=LABELED_NUM, specialist=SPECIALIST, generalist_term=GENERALIST_TERM)

if __name__ == "__main__":
    run_script(SETTINGS)
