"""SemiSAM (Zhang et al., 2023) on LA: mean teacher + frozen SAM-Med3D pseudo-labels from point prompts.

The generalist is prompted only by the student's prediction (the official script clicked on the ground truth
of the unlabeled scans). Settings below are the official script's: 128^3 patches, 4 labeled cases, batch 4
with 2 labeled, 10 clicks, ../ckpt/sam_med3d.pth (vit_b_ori); flags override them.
From code/:  python train_LA_semisam_mt.py [--flags]   (-h lists them)
From the repository root:  python code/train_LA_semisam_mt.py [--flags]   (the same default paths)
"""
from training.run import run_script

EXP = "LA/SemiSAM_MT"
LABELED_NUM = 4
PATCH_SIZE = (128, 128, 128)
SPECIALIST = "mt"
GENERALIST_TERM = "semisam"
GENERALIST = ["../ckpt/sam_med3d.pth"]
GENERALIST_ARCH = "vit_b_ori"
PROMPT = "point"
NUM_CLICKS = 10
SAM_WEIGHT = 0.1

SETTINGS = dict(exp=EXP, labeled_num=LABELED_NUM, patch_size=PATCH_SIZE, specialist=SPECIALIST,
                generalist_term=GENERALIST_TERM, generalist=GENERALIST, generalist_arch=GENERALIST_ARCH,
                prompt=PROMPT, num_clicks=NUM_CLICKS, sam_weight=SAM_WEIGHT)

if __name__ == "__main__":
    run_script(SETTINGS)
