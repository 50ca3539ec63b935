"""nearest_code vs brute force in float64: interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from titok_fast.kernels.fsq import FsqConstants, fsq_encoder_head, fsq_indices_to_codes_ref, fsq_quantize_ref
from titok_fast.kernels.nearest_code import nearest_code, nearest_code_ref

from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    pytest.param(torch.float32, 1e-4, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-2, id="bf16"),
]


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    """Interpreter without CUDA, whatever TRITON_INTERPRET was when triton was first imported."""
    with triton_mode(interpret=not torch.cuda.is_available()):
        yield


def _assert_nearest(x, codebook, metric, tol):
    """Same index as brute force, except where the brute-force distances of both picks are within tol (a
    near tie, decided by rounding); distances within tol of the exact ones (relative to the distance scale).

    L2 distances come from |x|^2 - 2 x.c + |c|^2 in float32, which cancels: near an exact hit the error is a few
    float32 ulps of |x|^2 + |c|^2, not of the distance (on an H200, 1.5e-4 at |x|^2 ~ 200). The interpreter
    computes dots exactly and hides this; the allowance below is 2**-20 (8 ulps) of those terms."""
    indices, distances = nearest_code(x, codebook, metric)
    ref_indices, ref_distances = nearest_code_ref(x, codebook, metric)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    scale = tol * (1 + ref_distances.abs())
    if metric == "l2":
        norms = x.double().pow(2).sum(1) + codebook[ref_indices].double().pow(2).sum(1)
        scale = scale + 2**-20 * norms
    picked = _distance(x, codebook[indices], metric)
    differ = indices != ref_indices
    assert ((picked - ref_distances.double()).abs()[differ] <= scale[differ]).all()
    assert differ.float().mean() <= 0.02
    assert ((distances - ref_distances).abs() <= scale).all()


def _distance(x, codes, metric):
    """float64 distance of each row of x to the matching row of codes."""
    x, codes = x.double(), codes.double()
    if metric == "l2":
        return ((x - codes) ** 2).sum(1)
    return 1 - torch.nn.functional.cosine_similarity(x, codes, dim=1, eps=1e-12)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim, num_codes", [(5, 300), (64, 200), (200, 130)], ids=["D5K300", "D64K200", "D200K130"])
def test_matches_brute_force(dim, num_codes, metric, dtype, tol):
    x = torch.randn(70, dim).to(device=DEVICE, dtype=dtype)
    codebook = torch.randn(num_codes, dim).to(device=DEVICE, dtype=dtype)
    x[:3] = codebook[[0, num_codes - 1, 65]]  # exact hits in the first, last and a middle tile
    before = x.clone(), codebook.clone()
    _assert_nearest(x, codebook, metric, tol)
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


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_large_codebook_bf16_gpu(metric):
    """K = 2**18 codes, D = 256, bf16: brute force agrees up to near ties."""
    x = torch.randn(300, 256, device=DEVICE, dtype=torch.bfloat16)
    codebook = torch.randn(2**18, 256, device=DEVICE, dtype=torch.bfloat16)
    x[:2] = codebook[[2**18 - 1, 70000]]
    _assert_nearest(x, codebook, metric, 2e-2)
