"""SemiSAM+ (Zhang et al., 2025) on LA: mean teacher + several frozen generalists whose disagreement weights
the pseudo-label loss voxel by voxel (confidence-aware; the loss keeps its gradient, unlike the official
code's ``x / (x + 1e-16)``).

Our defaults (the official LA recipe is spread over several scripts): MT specialist, prompt 'unc',
SAM-Med3D and SAM-Med3D-turbo, 128^3 patches, 4 labeled cases, batch 4 with 2 labeled.
From code/:  python train_LA_semisam_plus.py [--flags]   (-h lists them)
From the repository root:  python code/train_LA_semisam_plus.py [--flags]   (the same default paths)
"""
from training.run import run_script

EXP = "LA/SemiSAM_plus"
LABELED_NUM = 4
PATCH_SIZE = (128, 128, 128)
SPECIALIST = "mt"
GENERALIST_TERM = "semisam_plus"
GENERALIST = ["../ckpt/sam_med3d.pth", "../ckpt/sam_med3d_turbo.pth"]
GENERALIST_ARCH = "vit_b_ori"
PROMPT = "unc"
NUM_CLICKS = 10
SAM_WEIGHT = 0.1

SETTINGS = dict(exp=EXP, labeled_num=LABELED_NUM, patch_size=PATCH_SIZE, specialist=SPECIALIST,
                generalist_term=GENERALIST_TERM, generalist=GENERALIST, generalist_arch=GENERALIST_ARCH,
                prompt=PROMPT, num_clicks=NUM_CLICKS, sam_weight=SAM_WEIGHT)

if __name__ == "__main__":
    run_script(SETTINGS)
