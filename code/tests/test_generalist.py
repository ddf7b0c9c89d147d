"""Generalist branch (utils/generalist.py) with a real tiny Sam3D (golden fixture a: img 32, grid 4^3,
low-res masks 16^3) and with oracle mask decoders that prove the plumbing, geometry and thresholds."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.sam_med3d import build_sam3d_from_config
from utils.generalist import GeneralistBranch, _upsample_box, pseudo_label, sam_znorm

PATCH = (24, 24, 16)
S, LOW = 32, 16


@pytest.fixture(scope="module")
def sam(fixtures_dir):
    fx = torch.load(fixtures_dir / "sam3d_golden_a.pt", weights_only=True)
    model = build_sam3d_from_config(fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sam2(sam):
    """A second generalist: the same architecture with perturbed weights."""
    other = copy.deepcopy(sam)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return other


def _inputs(batch=2, shape=PATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, 1) + shape, generator=g)
    # a specialist that believes in a blob in the middle of every patch, shifted per sample
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                      indexing="ij"))
    probs = []
    for b in range(batch):
        centre = torch.tensor([n / 2 + 2 * b - 1 for n in shape]).view(3, 1, 1, 1)
        d2 = ((grid - centre) ** 2).sum(0)
        probs.append(torch.sigmoid(3.0 - d2 / 8.0))
    return images, torch.stack(probs)


# ------------------------------------------------------------------------------------------------
# shapes, dtypes, combinations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", ["pad", "resample"])
@pytest.mark.parametrize("prompt", ["point", "mask", "unc"])
@pytest.mark.parametrize("n_models", [1, 2])
def test_outputs_shapes_dtypes_and_weights(sam, sam2, prompt, geometry, n_models):
    models = [sam, sam2][:n_models]
    images, prob = _inputs()
    branch = GeneralistBranch(models, prompt=prompt, num_clicks=4, geometry=geometry)
    out = branch.pseudo_labels(images, prob)
    mask, weight = out.pseudo_label, out.confidence
    for t in (mask, weight):
        assert t.shape == (2,) + PATCH and t.dtype == torch.float32 and t.device == images.device
        assert not t.is_inference() and not t.requires_grad
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert weight.min() >= 0 and weight.max() <= 1
    variants_per_model = {"point": 1, "mask": 1, "unc": 3 + 1}[prompt]  # unc: clicks 1, 3, 4 + mask
    assert out.stats.variants == n_models * variants_per_model == len(out.variant_logits)
    if n_models == 1 and prompt != "unc":
        assert torch.equal(weight, torch.ones_like(weight))
    else:  # random-weight generalists disagree somewhere
        assert weight.min() < 0.99
    clicks = out.stats.clicks_positive + out.stats.clicks_negative
    assert clicks == (0 if prompt == "mask" else 2 * 4 * n_models)
    # usable as a loss target for a trainable prediction
    p = torch.rand((2,) + PATCH, requires_grad=True)
    (weight * (p - mask) ** 2 + p * mask).mean().backward()
    assert p.grad is not None


# ------------------------------------------------------------------------------------------------
# oracle decoders: the branch must hand back exactly what the decoder says, in patch coordinates
# ------------------------------------------------------------------------------------------------
class OracleDecoder(nn.Module):
    """Stands in for MaskDecoder3D and returns fixed low-res logits (B, 1, 16, 16, 16)."""

    def __init__(self, low_logits):
        super().__init__()
        self.low_logits = low_logits
        self.calls = 0

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        assert multimask_output is False
        b = self.low_logits.shape[0]
        assert image_embeddings.shape[0] == sparse_prompt_embeddings.shape[0] == b
        assert dense_prompt_embeddings.shape[0] == b
        self.calls += 1
        return self.low_logits.clone(), torch.zeros(b, 1)


# Boxes in low-res cells (x0, x1, y0, y1, z0, z1) per sample. A low-res cell is 2 SAM voxels. The
# logits are +10 inside and -5 outside because trilinear x2 upsampling gives a box-corner voxel only
# 0.75^3 = 0.42 of its own cell and a voxel beside a face 0.25 of the neighbour cell: any inside value
# between 1.37 and 3 times the outside magnitude reproduces the box exactly.
BOXES = [[(2, 7, 4, 8, 4, 7), (9, 13, 3, 6, 8, 12)],
         [(4, 12, 6, 10, 5, 11)]]
IN, OUT = 10.0, -5.0


def _oracle_low(boxes_per_sample):
    low = torch.full((len(boxes_per_sample), 1, LOW, LOW, LOW), OUT)
    for b, boxes in enumerate(boxes_per_sample):
        for x0, x1, y0, y1, z0, z1 in boxes:
            low[b, 0, x0:x1, y0:y1, z0:z1] = IN
    return low


def _with_decoder(model, decoder):
    """A copy of ``model`` whose mask decoder is ``decoder`` (pytest's monkeypatch cannot restore
    nn.Module children, which live in ``_modules`` rather than the instance ``__dict__``)."""
    patched = copy.deepcopy(model)
    patched.mask_decoder = decoder
    return patched


def _specialist_prob(mask, seed=1):
    """A probability on the right side of 0.5 everywhere (0.55..0.95 inside, 0.05..0.45 outside)."""
    u = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(mask, 0.55 + 0.4 * u, 0.05 + 0.4 * u)


@pytest.mark.parametrize("prompt", ["point", "mask", "unc"])
def test_oracle_pad_geometry_returns_specialist_mask_exactly(sam, sam2, prompt):
    patch = (24, 21, 16)  # odd padding along y: 11 voxels -> 5 before, 6 after
    before = [(S - n) // 2 for n in patch]
    assert before == [4, 5, 8]
    low = _oracle_low(BOXES)
    full = low.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)[:, 0] > 0
    expected = full[:, before[0]:before[0] + 24, before[1]:before[1] + 21, before[2]:before[2] + 16]
    assert 0 < expected.float().mean() < 0.5  # a non-trivial mask
    prob = _specialist_prob(expected)
    images = torch.randn((2, 1) + patch, generator=torch.Generator().manual_seed(2))
    oracles = [OracleDecoder(low), OracleDecoder(low)]
    first, second = _with_decoder(sam, oracles[0]), _with_decoder(sam2, oracles[1])
    for models in ([first], [first, second]):
        mask, weight = GeneralistBranch(models, prompt=prompt, num_clicks=5, geometry="pad")(images, prob)
        assert torch.equal(mask, expected.float())
        assert torch.equal(weight, torch.ones_like(weight))
    per_model = {"point": 5, "mask": 1, "unc": 6}[prompt]
    assert oracles[0].calls == 2 * per_model and oracles[1].calls == per_model


@pytest.mark.parametrize("prompt", ["point", "unc"])
def test_oracle_resample_geometry_returns_specialist_mask_exactly(sam, prompt):
    # patch 24 x 24 x 16 -> SAM 32^3 -> low-res 16^3: a low-res cell is 1.5 x 1.5 x 1 patch voxels, so
    # boxes with even cell bounds along x, y have integer patch bounds (x1.5) and z bounds map 1:1
    boxes = [[(2, 8, 4, 10, 3, 9), (10, 14, 2, 6, 11, 15)], [(4, 12, 6, 12, 0, 7)]]
    expected = torch.zeros((2,) + PATCH, dtype=torch.bool)
    for b, bxs in enumerate(boxes):
        for x0, x1, y0, y1, z0, z1 in bxs:
            expected[b, x0 * 3 // 2:x1 * 3 // 2, y0 * 3 // 2:y1 * 3 // 2, z0:z1] = True
    prob = _specialist_prob(expected)
    images = torch.randn((2, 1) + PATCH, generator=torch.Generator().manual_seed(3))
    oracle = _with_decoder(sam, OracleDecoder(_oracle_low(boxes)))
    mask, weight = GeneralistBranch([oracle], prompt=prompt, num_clicks=3, geometry="resample")(images, prob)
    assert torch.equal(mask, expected.float())
    assert torch.equal(weight, torch.ones_like(weight))


@pytest.mark.parametrize("prompt", ["point", "unc"])
def test_threshold_is_logit_zero(sam, prompt):
    # official defect 3 thresholded logits at 0.5: +0.3 would have been background
    low = torch.empty(2, 1, LOW, LOW, LOW)
    low[0], low[1] = 0.3, -0.3
    images, prob = _inputs()
    mask, _ = GeneralistBranch(_with_decoder(sam, OracleDecoder(low)), prompt=prompt, num_clicks=2)(images, prob)
    assert mask[0].eq(1).all() and mask[1].eq(0).all()


def test_pad_value_image_mapping_and_znorm(sam):
    """The encoder sees the z-normalised patch (stats over voxels > 0) centred in the cube, padded with
    the sample's normalised minimum; with 'resample' the trilinear resize of the normalised patch."""
    images, prob = _inputs()
    images[1] = images[1] * 3 + 1.5  # different statistics per sample
    seen = []
    handle = sam.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        GeneralistBranch(sam, prompt="mask", geometry="pad")(images, prob)
        GeneralistBranch(sam, prompt="mask", geometry="resample")(images, prob)
    finally:
        handle.remove()
    normed = torch.empty_like(images)
    for b in range(2):
        x = images[b].double()
        pos = x[x > 0]
        normed[b] = ((x - pos.mean()) / pos.std()).float()  # torch's std is unbiased like torchio's
    torch.testing.assert_close(sam_znorm(images), normed, rtol=1e-5, atol=1e-5)
    padded, resampled = seen
    assert padded.shape == resampled.shape == (2, 1, S, S, S)
    torch.testing.assert_close(padded[:, :, 4:28, 4:28, 8:24], normed, rtol=1e-5, atol=1e-5)
    inside = torch.zeros(S, S, S, dtype=torch.bool)
    inside[4:28, 4:28, 8:24] = True
    for b in range(2):
        assert torch.equal(padded[b, 0][~inside].unique(), padded[b, 0][inside].min().view(1))
    torch.testing.assert_close(resampled, F.interpolate(normed, size=(S, S, S), mode="trilinear",
                                                        align_corners=False), rtol=1e-5, atol=1e-5)


def test_znorm_degenerate_volumes_do_not_fail():
    x = torch.zeros(2, 1, 4, 4, 4)
    x[1] = -torch.arange(64.0).view(1, 4, 4, 4)  # no voxel > 0: whole-volume statistics
    out = sam_znorm(x)
    assert torch.isfinite(out).all()
    assert out[0].eq(0).all()
    torch.testing.assert_close(out[1].mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1].std(), torch.tensor(1.0), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# prompts, batching, state
# ------------------------------------------------------------------------------------------------
def test_encoder_once_per_call_for_whole_batch(sam, sam2):
    calls = {id(sam): [], id(sam2): []}
    handles = [m.image_encoder.register_forward_hook(
        lambda mod, args, out, key=id(m): calls[key].append(args[0].shape[0])) for m in (sam, sam2)]
    try:
        images, prob = _inputs(batch=3)
        GeneralistBranch([sam], prompt="point", num_clicks=10)(images, prob)
        assert calls[id(sam)] == [3]
        GeneralistBranch([sam, sam2], prompt="unc", num_clicks=10)(images, prob)
        assert calls[id(sam)] == [3, 3] and calls[id(sam2)] == [3]
    finally:
        for h in handles:
            h.remove()


def test_point_prompts_accumulate_clicks_and_feed_back_logits(sam):
    prompts, outputs = [], []
    h1 = sam.prompt_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: prompts.append(kwargs), with_kwargs=True)
    h2 = sam.mask_decoder.register_forward_hook(lambda m, args, out: outputs.append(out[0].clone()))
    try:
        images, prob = _inputs()
        branch = GeneralistBranch(sam, prompt="point", num_clicks=4)
        stats = branch.pseudo_labels(images, prob).stats
    finally:
        h1.remove()
        h2.remove()
    assert len(prompts) == len(outputs) == 4
    assert torch.equal(prompts[0]["masks"], torch.zeros(2, 1, LOW, LOW, LOW))
    for k in range(4):
        coords, labels = prompts[k]["points"]
        assert coords.shape == (2, k + 1, 3) and labels.shape == (2, k + 1)
        assert coords.dtype == torch.int64 and prompts[k]["boxes"] is None
        if k:
            assert torch.equal(coords[:, :k], prompts[k - 1]["points"][0])  # all clicks so far
            assert torch.equal(prompts[k]["masks"], outputs[k - 1])  # previous low-res logits
    # first click: SAM predicts nothing yet, so it is the centre of the specialist's blob in SAM
    # coordinates (patch offset 4, 4, 8), positive
    first, first_labels = prompts[0]["points"]
    target = prob > 0.5
    for b in range(2):
        x, y, z = (first[b, 0] - torch.tensor([4, 4, 8])).tolist()
        assert target[b, x, y, z]
        assert first_labels[b, 0] == 1
    n_pos = sum(int(p["points"][1][:, -1].sum()) for p in prompts)
    assert stats.clicks_positive == n_pos
    assert stats.clicks_negative == 8 - n_pos


def test_first_click_is_shared_by_the_models(sam, sam2):
    firsts = []
    hooks = [m.prompt_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: firsts.append(kwargs["points"]) if kwargs["points"][0].shape[1] == 1
        else None, with_kwargs=True) for m in (sam, sam2)]
    try:
        images, prob = _inputs()
        GeneralistBranch([sam, sam2], prompt="point", num_clicks=2)(images, prob)
    finally:
        for h in hooks:
            h.remove()
    assert len(firsts) == 2
    assert torch.equal(firsts[0][0], firsts[1][0]) and torch.equal(firsts[0][1], firsts[1][1])


def test_mask_prompt_is_specialist_probability_at_low_res(sam):
    seen = []
    h = sam.prompt_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        images = torch.randn((2, 1) + PATCH)
        prob = torch.full((2,) + PATCH, 0.8)
        prob[1] = 0.3
        GeneralistBranch(sam, prompt="mask")(images, prob)
    finally:
        h.remove()
    assert len(seen) == 1 and seen[0]["points"] is None
    m = seen[0]["masks"]
    assert m.shape == (2, 1, LOW, LOW, LOW)
    # SAM cube: patch at [4:28, 4:28, 8:24]; a low-res cell j averages SAM voxels 2j and 2j+1, so
    # cells [2:14, 2:14, 4:12] lie inside the patch and the cells of the padding see probability 0
    inside = m[:, 0, 2:14, 2:14, 4:12]
    torch.testing.assert_close(inside, torch.tensor([0.8, 0.3]).view(2, 1, 1, 1).expand_as(inside),
                               rtol=0, atol=1e-6)
    assert m[:, :, :2].eq(0).all() and m[:, :, 14:].eq(0).all() and m[..., :4].eq(0).all()


class _OneByOne(nn.Module):
    """Runs a batched sub-module one sample at a time. Batched float32 matmuls differ from single-sample
    ones in the last bits (~1e-6), which can flip a voxel at the threshold; one-by-one evaluation makes
    the network exactly batch-invariant, so any difference left comes from the branch's own state."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        def pick(v, i):
            batched = torch.is_tensor(v) and v.dim() > 0 and v.shape[0] > 1
            return v[i:i + 1] if batched else v
        first = (list(args) + list(kwargs.values()))[0]
        outs = [self.inner(*[pick(a, i) for a in args], **{k: pick(v, i) for k, v in kwargs.items()})
                for i in range(first.shape[0])]
        if torch.is_tensor(outs[0]):
            return torch.cat(outs)
        return tuple(torch.cat(parts) for parts in zip(*outs))


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_no_state_leaks_between_samples(sam, order):
    """Official defect 4: the previous mask leaked from one sample into the next. Sample A alone and A
    inside a batch must give the same pseudo-label."""
    model = copy.deepcopy(sam)
    model.image_encoder = _OneByOne(model.image_encoder)
    model.mask_decoder = _OneByOne(model.mask_decoder)
    images, prob = _inputs(batch=2, seed=4)
    kw = dict(prompt="point", num_clicks=6, edt_clicks=6)  # deterministic clicks per sample
    alone, _ = GeneralistBranch(model, **kw)(images[:1], prob[:1])
    idx = [0, 1] if order == "AB" else [1, 0]
    batched, _ = GeneralistBranch(model, **kw)(images[idx], prob[idx])
    assert torch.equal(batched[idx.index(0)], alone[0])
    assert not torch.equal(batched[idx.index(1)], alone[0])  # B's answer is its own


def test_generator_makes_calls_reproducible(sam):
    images, prob = _inputs()
    a = GeneralistBranch(sam, prompt="point", num_clicks=5)(images, prob)[0]
    b = GeneralistBranch(sam, prompt="point", num_clicks=5,
                         generator=torch.Generator().manual_seed(0))(images, prob)[0]
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(11)
    branch = GeneralistBranch(sam, prompt="point", num_clicks=5, generator=g)
    state = g.get_state()
    first = branch(images, prob)[0]
    assert not torch.equal(g.get_state(), state)  # the random clicks drew from it
    g.set_state(state)
    assert torch.equal(branch(images, prob)[0], first)
    assert torch.equal(pseudo_label([sam], images, prob, prompt="point", num_clicks=5)[0], a)


def test_bf16_autocast_runs_and_returns_float32(sam):
    images, prob = _inputs()
    mask, weight = GeneralistBranch(sam, prompt="unc", num_clicks=3, amp_dtype=torch.bfloat16)(images, prob)
    assert mask.dtype == weight.dtype == torch.float32 and mask.shape == (2,) + PATCH


# ------------------------------------------------------------------------------------------------
# contract and errors
# ------------------------------------------------------------------------------------------------
def test_branch_takes_no_labels():
    assert list(inspect.signature(GeneralistBranch.__call__).parameters) == ["self", "images", "student_fg_prob"]
    # embeddings: the branch's own encode(images), reused across the prompts of several classes
    assert list(inspect.signature(GeneralistBranch.pseudo_labels).parameters) == ["self", "images", "student_fg_prob",
                                                                                  "embeddings"]
    params = inspect.signature(pseudo_label).parameters
    assert [p for p in params if "label" in p or "target" in p or "gt" in p] == []


def test_bad_inputs_raise_clear_errors(sam):
    images, prob = _inputs()
    big = torch.randn(1, 1, 40, 24, 16)
    with pytest.raises(ValueError, match=r"does not fit SAM's 32\^3 input; use geometry='resample'"):
        GeneralistBranch(sam)(big, torch.rand(1, 40, 24, 16))
    # the same patch works with resample
    assert GeneralistBranch(sam, geometry="resample", prompt="mask")(big, torch.rand(1, 40, 24, 16))[0].shape \
        == (1, 40, 24, 16)
    with pytest.raises(ValueError, match="unknown prompt 'box'"):
        GeneralistBranch(sam, prompt="box")
    with pytest.raises(ValueError, match="unknown geometry"):
        GeneralistBranch(sam, geometry="crop")
    with pytest.raises(ValueError, match="non-empty list"):
        GeneralistBranch([])
    with pytest.raises(ValueError, match="unc_clicks"):
        GeneralistBranch(sam, prompt="unc", num_clicks=3, unc_clicks=[4])
    with pytest.raises(ValueError, match=r"foreground probability \(B, X, Y, Z\)"):
        GeneralistBranch(sam)(images, torch.stack([1 - prob, prob], dim=1))  # both softmax channels
    with pytest.raises(ValueError, match=r"probability in \[0, 1\].*not logits"):
        GeneralistBranch(sam)(images, prob * 4 - 2)
    with pytest.raises(ValueError, match=r"images must be \(B, 1, X, Y, Z\)"):
        GeneralistBranch(sam)(images[:, 0], prob)


@pytest.mark.parametrize("size, low_size", [(128, 32), (32, 16), (30, 10)])
def test_upsampling_inside_a_box_equals_cropping_the_full_upsampling_bitwise(size, low_size):
    # the clicks only need SAM's logits inside the patch box: same values, bit for bit, as before
    low = torch.randn(2, 1, low_size, low_size, low_size, generator=torch.Generator().manual_seed(size))
    full = F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)[:, 0]
    g = torch.Generator().manual_seed(1)
    boxes = [(slice(0, size),) * 3, (slice(0, 5), slice(size - 7, size), slice(1, size - 1))]
    for _ in range(6):
        ends = [sorted(torch.randint(0, size + 1, (2,), generator=g).tolist()) for _ in range(3)]
        boxes.append(tuple(slice(a, max(b, a + 1)) for a, b in ends))
    for box in boxes:
        assert torch.equal(_upsample_box(low, size, box), full[(slice(None),) + box]), box


def test_pad_geometry_clicks_stay_inside_the_patch_even_for_an_empty_specialist(sam):
    # nothing to click on: the negative click lands inside the patch, not in SAM's padding
    seen = []
    h = sam.prompt_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["points"]), with_kwargs=True)
    try:
        images, prob = _inputs()
        prob[1] = 0.0
        GeneralistBranch(sam, prompt="point", num_clicks=6)(images, prob)
    finally:
        h.remove()
    coords, labels = seen[-1]
    lo, hi = torch.tensor([4, 4, 8]), torch.tensor([28, 28, 24])  # patch 24 x 24 x 16 centred in 32^3
    assert ((coords >= lo) & (coords < hi)).all()
    assert labels[1].eq(0).all()  # an empty specialist target only ever gets negative clicks


def test_patch_embedding_stays_float32_under_bf16_autocast(sam):
    # oneDNN's bf16 kernel for this conv is many times slower than float32 on AVX-512 CPUs (results/history.md,
    # "Second pass", item 5); the layer opts out
    x = torch.randn(2, 1, S, S, S, generator=torch.Generator().manual_seed(4))
    embed = sam.image_encoder.patch_embed
    with torch.inference_mode():
        ref = embed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = embed(x)
            after = sam.image_encoder.blocks[0].mlp.lin1(out)   # later layers still autocast
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert after.dtype == torch.bfloat16


def test_bf16_pseudo_labels_agree_with_fp32_on_real_la_patches(sam, la_data_dir):
    # the mask prompt isolates the numerics of encoder + decoder under bf16 autocast. (Point prompts compound
    # differences: one flipped voxel changes the next random click, so with these random fixture weights their
    # agreement is ~89 %; with trained weights it is a property of the checkpoint, reported by bench_encoder.)
    from dataloaders.la_heart import load_case, read_list
    cases = read_list(la_data_dir.parent / "train.list")[:4]
    images, labels = [], []
    for case in cases:
        image, label = load_case(la_data_dir, case)
        # a 96 x 96 x 64 centre box at stride 4: 24 x 24 x 16, SAM input 32^3 for fixture a
        box = tuple(slice((s - n) // 2, (s - n) // 2 + n, 4) for s, n in zip(image.shape, (96, 96, 64)))
        images.append(torch.from_numpy(image[box].copy()))
        labels.append(torch.from_numpy(label[box].astype("float32")))
    images, prob = torch.stack(images)[:, None], 0.05 + 0.9 * torch.stack(labels)
    fp32, _ = GeneralistBranch(sam, prompt="mask")(images, prob)
    bf16, _ = GeneralistBranch(sam, prompt="mask", amp_dtype=torch.bfloat16)(images, prob)
    assert 0.05 < fp32.mean() < 0.95
    assert (fp32 == bf16).float().mean() >= 0.99


def test_timer_sections_and_encode_once_decode_per_prompt(sam, sam2):
    """The branch charges its work to ``timer`` (the sections the benchmarks report): each image encoder
    once per call, one prompt-encoder and mask-decoder call per prompt, click 1 once per SAM input size,
    the later clicks once per click and model."""
    from training.timing import SectionTimer
    from utils.generalist import TIMER_SECTIONS
    timer = SectionTimer()
    images, prob = _inputs()
    branch = GeneralistBranch([sam, sam2], prompt="unc", num_clicks=4, timer=timer)
    out = branch.pseudo_labels(images, prob)
    assert set(timer.counts) == set(TIMER_SECTIONS)
    decodes = 2 * (4 + 1)                     # per model: 4 clicks + the mask prompt
    assert timer.counts["generalist.encoder"] == 2
    assert timer.counts["generalist.prompt_encoder"] == timer.counts["generalist.decoder"] == decodes
    assert timer.counts["generalist.first_click"] == 1 and timer.counts["generalist.clicks"] == 2 * 3
    # the same numbers as a branch without a timer
    plain = GeneralistBranch([sam, sam2], prompt="unc", num_clicks=4).pseudo_labels(images, prob)
    assert torch.equal(out.pseudo_label, plain.pseudo_label) and torch.equal(out.confidence, plain.confidence)


def test_encode_and_decode_are_the_predictor_split(sam):
    """A caller may encode once and decode its own prompts: a mask prompt decoded by hand gives the
    branch's 'mask' pseudo-label logits."""
    import torch.nn.functional as F
    images, prob = _inputs()
    branch = GeneralistBranch(sam, prompt="mask", geometry="pad")
    out = branch.pseudo_labels(images, prob)
    with torch.inference_mode():
        (emb,) = branch.encode(images)
        sam_prob = emb.geometry.to_sam(prob.float().unsqueeze(1), 0.0)
        low = branch.decode(emb, None, F.interpolate(sam_prob, size=(emb.low_size,) * 3, mode="trilinear",
                                                     align_corners=False))
        logits = emb.geometry.logits_to_patch(low)
    assert low.shape == (2, 1, LOW, LOW, LOW)
    assert torch.equal(logits, out.variant_logits[0]) and torch.equal((logits > 0).float(), out.pseudo_label)


def test_precomputed_embeddings_give_the_same_pseudo_labels(sam, sam2):
    # what the K-class generalist term does: encode once, prompt once per class
    images, prob = _inputs()
    a = GeneralistBranch([sam, sam2], prompt="unc", num_clicks=3, generator=torch.Generator().manual_seed(4))
    b = GeneralistBranch([sam, sam2], prompt="unc", num_clicks=3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        embeddings = b.encode(images)
    out_a, out_b = a.pseudo_labels(images, prob), b.pseudo_labels(images, prob, embeddings)
    assert torch.equal(out_a.pseudo_label, out_b.pseudo_label) and torch.equal(out_a.confidence, out_b.confidence)
