"""nearest_code vs brute force in float64: interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from titok_fast.kernels.fsq import FsqConstants, fsq_encoder_head, fsq_indices_to_codes_ref, fsq_quantize_ref
from titok_fast.kernels.nearest_code import MAX_CODES, NORM_EPS, nearest_code, nearest_code_ref

from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]  # fmt: skip
EPS32 = torch.finfo(torch.float32).eps
NOISE_MULTIPLE = 4  # the kernel may round up to this many times worse than the float32 reference does
MIN_NOISE_ULPS = 2  # the noise taken is never below 2 ulps (see _tolerances)
MIN_RESOLVED = 0.9  # rows whose nearest code the tolerances leave no doubt about, at the least


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    """Interpreter without CUDA, whatever TRITON_INTERPRET was when triton was first imported."""
    with triton_mode(interpret=not torch.cuda.is_available()):
        yield


def _distances(x: torch.Tensor, codebook: torch.Tensor, metric: str, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] distances by the kernel's own formula, computed in dtype: float32 rounds where the kernel rounds (its
    16-bit inputs are exact in float32, their products too), float64 is the truth for the same inputs."""
    x, c = x.to(dtype), codebook.to(dtype)
    x_sq, c_sq, xc = (x * x).sum(1), (c * c).sum(1), x @ c.T
    if metric == "cosine":
        return 1 + (-xc / c_sq.sqrt().clamp_min(NORM_EPS)) / x_sq.sqrt().clamp_min(NORM_EPS)[:, None]
    return (x_sq[:, None] + (c_sq - 2 * xc)).clamp_min(0)


def _tolerances(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """float64 distances [N, K], the error allowed on each, and the float32 reference's noise in ulps.

    The noise is the float32 reference's largest error in ulps (float32 eps) of the terms its formula adds:
    |x|^2 + |c|^2 for L2, 1 for cosine. L2's |x|^2 - 2 x.c + |c|^2 cancels: near an exact hit the error is a few
    ulps of those terms, not of the distance (an H200 run found 1.5e-4 at |x|^2 ~ 200, 3 such ulps; the
    interpreter's exact dots hide this). The kernel may err NOISE_MULTIPLE times that noise (its sums run in
    another order; on a GPU, fp32 dots run as tf32x3 and its division and sqrt are the fast, approximate ones),
    and the noise taken is at least MIN_NOISE_ULPS, so at least 8 ulps are allowed."""
    truth = _distances(x, codebook, metric, torch.float64)
    terms = torch.ones_like(truth)
    if metric == "l2":
        x64, c64 = x.double(), codebook.double()
        terms = (x64 * x64).sum(1)[:, None] + (c64 * c64).sum(1)
    noise_ulps = ((_distances(x, codebook, metric, torch.float32).double() - truth).abs() / terms).max().item() / EPS32
    return truth, NOISE_MULTIPLE * max(noise_ulps, MIN_NOISE_ULPS) * EPS32 * terms, noise_ulps


def _assert_nearest(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    """The kernel's distance is within the tolerance of the exact distance of the code it picked; it picks the
    reference's code wherever the reference's margin exceeds the tolerances (every other code's exact distance,
    less its tolerance, above the best code's plus its tolerance), which holds on at least MIN_RESOLVED of the
    rows; elsewhere (near ties) the code it picked could have been the best within the tolerances."""
    indices, distances = nearest_code(x, codebook, metric)
    ref_indices, _ = nearest_code_ref(x, codebook, metric)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    truth, tol, noise_ulps = _tolerances(x, codebook, metric)
    rows = torch.arange(len(x), device=x.device)
    best_high = truth[rows, ref_indices] + tol[rows, ref_indices]
    others_low = (truth - tol).index_put((rows, ref_indices), truth.new_tensor(float("inf")))
    resolved = others_low.min(1).values > best_high
    error = (distances.double() - truth[rows, indices]).abs()
    detail = f"noise {noise_ulps:.2f} ulps, kernel error {(error / tol[rows, indices]).max():.3f} of the tolerance"
    assert (error <= tol[rows, indices]).all(), detail
    assert torch.equal(indices[resolved], ref_indices[resolved]), detail
    assert (truth[rows, indices] - tol[rows, indices] <= best_high).all(), detail
    assert resolved.float().mean() >= MIN_RESOLVED, f"only {resolved.float().mean():.2f} of the rows resolved"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim, num_codes", [(5, 300), (64, 200), (200, 130)], ids=["D5K300", "D64K200", "D200K130"])
def test_matches_brute_force(dim, num_codes, metric, dtype):
    x = torch.randn(70, dim).to(device=DEVICE, dtype=dtype)
    codebook = torch.randn(num_codes, dim).to(device=DEVICE, dtype=dtype)
    x[:3] = codebook[[0, num_codes - 1, 65]]  # exact hits in the first, last and a middle tile
    before = x.clone(), codebook.clone()
    _assert_nearest(x, codebook, metric)
    assert torch.equal(x, before[0]) and torch.equal(codebook, before[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_the_lowest_index(metric):
    """Duplicated codebook rows (integer-valued, so every distance is exact) within and across tiles."""
    codebook = torch.randint(-3, 4, (200, 16)).float()
    codebook[[9, 70, 130, 199]] = codebook[5].clone()  # a later row of the same tile, and other tiles
    codebook[[140, 150]] = codebook[100].clone()  # first occurrence not in the first tile
    x = codebook[[5, 9, 130, 100, 150]].clone()
    indices, _ = nearest_code(x.to(DEVICE), codebook.to(DEVICE), metric)
    expected = nearest_code_ref(x, codebook, metric)[0]
    assert expected.tolist()[:4] == [5, 5, 5, 100] and torch.equal(indices.cpu(), expected)


def test_fsq_codebook_cross_check():
    """Brute-force search on the implicit FSQ codebook (scaled by half_width) picks FSQ's own index."""
    levels = [7, 7, 7, 5, 5]
    consts = FsqConstants.of(levels)
    codebook = fsq_indices_to_codes_ref(torch.arange(consts.codebook_size), consts)
    z = torch.randn(64, len(levels)) * 1.5
    bounded = torch.tanh(z + consts.shift) * consts.half_l - consts.offset
    _, fsq_indices = fsq_quantize_ref(z, consts)
    indices, _ = nearest_code((bounded / consts.half_width).to(DEVICE), codebook.to(DEVICE), "l2")
    assert torch.equal(indices.cpu(), fsq_indices.long())

    # the same through the fused encoder head, whose z is the head's own output
    width = 32
    x = torch.randn(64, width)
    weights = [torch.ones(width), torch.zeros(width), torch.randn(len(levels), width) / 3, torch.zeros(len(levels))]
    _, head_indices = fsq_encoder_head(x.to(DEVICE), *[w.to(DEVICE) for w in weights], consts.to(DEVICE))
    z = torch.nn.functional.layer_norm(x, (width,)) @ weights[2].T
    bounded = torch.tanh(z + consts.shift) * consts.half_l - consts.offset
    indices, _ = nearest_code((bounded / consts.half_width).to(DEVICE), codebook.to(DEVICE), "l2")
    near_tie = ((bounded - bounded.floor() - 0.5).abs() < 1e-5).any(1)
    assert torch.equal(indices.cpu()[~near_tie], head_indices.cpu().long()[~near_tie])


def test_bad_arguments():
    x, codebook = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="metric"):
        nearest_code(x, codebook, "dot")
    with pytest.raises(ValueError, match="same D"):
        nearest_code(x, codebook[:, :4])
    with pytest.raises(TypeError, match="dtype"):
        nearest_code(x, codebook.half())
    with pytest.raises(ValueError, match="same D"):
        nearest_code(torch.randn(4, 300, device=DEVICE), torch.randn(10, 300, device=DEVICE))
    # the kernel's int32 code counter would wrap past 2**31 - 1: refused before a launch (a view, nothing held)
    with pytest.raises(ValueError, match=f"K in 1..{MAX_CODES}"):
        nearest_code(x, codebook[:1].expand(MAX_CODES + 1, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_large_codebook_bf16_gpu(metric):
    """K = 2**18 codes, D = 256, bf16: brute force agrees up to near ties."""
    x = torch.randn(300, 256, device=DEVICE, dtype=torch.bfloat16)
    codebook = torch.randn(2**18, 256, device=DEVICE, dtype=torch.bfloat16)
    x[:2] = codebook[[2**18 - 1, 70000]]
    _assert_nearest(x, codebook, metric)
