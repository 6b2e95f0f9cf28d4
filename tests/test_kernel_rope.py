"""kernels.rope against its PyTorch reference and the official V-JEPA 2 code: odd shapes, strided q/k views, the tiled
frequency quirk, gradients, unwritten outputs, input errors, grid_positions."""
import pytest
import torch

from vjepa_fast.kernels import grid_positions, rope, rope_reference
from helpers import KERNEL_DEVICES as DEVICES

pytestmark = pytest.mark.usefixtures("poison_empty")

# Against the reference in x's dtype (the official computation). fp32: sin and cos may differ from torch's by an
# ulp, so outputs by ~1e-7 of the inputs' scale. 16-bit: every step is rounded as torch rounds it, so the results
# are equal on the CPU (checked exactly there); on a GPU a sin or cos an fp32 ulp away from torch's may round to
# the other 16-bit neighbour: a 16-bit ulp.
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 1e-6), torch.float16: (2e-3, 1e-6),
       torch.float64: (1e-12, 1e-12)}  # (rtol, atol relative to max |x|)

SHAPES = [  # (rows, heads, hd): d = 2 * ((hd // 3) // 2) per axis, hd - 3d copied
    (1, 1, 6),  # d = 2, no tail
    (7, 3, 8),  # d = 2, tail 2
    (33, 16, 30),  # d = 10, no tail
    (7, 22, 32),  # d = 10, tail 2
    (33, 3, 64),  # d = 20, tail 4
    (1023, 16, 64),  # ViT-L / ViT-g head dim
    (33, 22, 80),  # d = 26: half = 13 is odd
    (1023, 1, 88),  # d = 28, tail 4
    (7, 16, 88),  # ViT-g/16 at 16 heads
    (33, 1, 128),  # d = 42, tail 2
    (7, 3, 9),  # odd hd: tail 3
    (7, 3, 4),  # hd < 6: nothing rotated
]

# On the GPU every Triton specialisation is a compilation (~1 s each): there the models' head dims (ViT-L, ViT-g
# xformers: 64; ViT-H: 80; ViT-g: 88; the predictor: 32) and one odd one run; the interpreter runs every shape.
GPU_SHAPES = [(1023, 16, 64), (33, 22, 80), (7, 16, 88), (7, 22, 32), (7, 3, 9)]


def on_gpu_only_for(device, selected):
    if device == "cuda" and not selected:
        pytest.skip("a shape the interpreter covers (GPU_SHAPES: the models' head dims)")


def make_positions(rows, device, seed, dtype=torch.int64):
    """Realistic (t, h, w): t < 32, h and w < 24."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, hi, (rows,), generator=g) for hi in (32, 24, 24)], dim=1).to(device, dtype)


def make_qkv(rows, heads, hd, dtype, device, seed):
    """A packed qkv matrix [rows, 3 * heads * hd] (a leaf that requires grad)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3 * heads * hd, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()


def k_view(qkv, heads, hd):
    """The k part of a packed qkv matrix: [rows, heads, hd] with row stride 3 * heads * hd and an offset."""
    return qkv.view(qkv.shape[0], 3, heads, hd)[:, 1]


def assert_close(got, want, dtype, scale):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(float(scale), 1e-30))


def check_against_reference(leaf, view, pos, seed):
    """rope(view(leaf)) and the grad of leaf against the reference (in the same dtype) on a copy of leaf."""
    x = view(leaf)
    before = x.detach().clone()
    out = rope(x, pos)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device and out.is_contiguous()
    assert torch.equal(x.detach(), before)
    leaf_ref = leaf.detach().clone().requires_grad_()
    ref = rope_reference(view(leaf_ref), pos)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, g)
    (ref_grad,) = torch.autograd.grad(ref, leaf_ref, g)
    assert ref.dtype == x.dtype and grad.dtype == leaf.dtype and grad.shape == leaf.shape
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)  # every rounding step as torch's
    assert_close(out, ref, x.dtype, x.detach().abs().max())
    assert_close(grad, ref_grad, x.dtype, g.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_on_a_qkv_view(shape, dtype, device):
    on_gpu_only_for(device, shape in GPU_SHAPES)
    rows, heads, hd = shape
    seed = SHAPES.index(shape)
    check_against_reference(make_qkv(*shape, dtype, device, seed), lambda t: k_view(t, heads, hd),
                            make_positions(rows, device, seed), seed=seed + 100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes(dtype, device):
    check_against_reference(make_qkv(33, 3, 80, dtype, device, seed=30), lambda t: k_view(t, 3, 80),
                            make_positions(33, device, seed=31), seed=32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "heads_strided", "last_dim_strided", "int32_pos", "strided_pos"])
def test_layouts(layout, device):
    """Contiguous x, x with a head stride other than hd (per-head qkv layout), x whose last dim is strided (copied
    first), int32 positions, positions viewed with strides."""
    rows, heads, hd = 33, 3, 64
    leaf = torch.randn(rows, 3 * heads * hd, generator=torch.Generator().manual_seed(40)).to(device).requires_grad_()
    if layout == "heads_strided":
        view = lambda t: t.view(rows, heads, 3, hd)[:, :, 2]  # noqa: E731
    elif layout == "last_dim_strided":
        view = lambda t: t.view(rows, 3, hd, heads)[:, 0].transpose(1, 2)  # noqa: E731
    else:
        view = lambda t: t.view(rows, 3, heads, hd)[:, 0].contiguous()  # noqa: E731
    pos = make_positions(rows, device, seed=41, dtype=torch.int32 if layout == "int32_pos" else torch.int64)
    if layout == "strided_pos":
        pos = torch.stack([pos, -pos], dim=2).reshape(rows, 6)[:, ::2]
        assert pos.stride() == (6, 2)
    check_against_reference(leaf, view, pos, seed=42)


@pytest.mark.parametrize("device", DEVICES)
def test_q_and_k_in_one_launch(device):
    """q and k of a packed qkv as one [rows, 2 * heads, hd] view give the two separate results."""
    rows, heads, hd = 7, 3, 80
    qkv = make_qkv(rows, heads, hd, torch.float32, device, seed=50)
    pos = make_positions(rows, device, seed=51)
    both = rope(qkv.view(rows, 3 * heads, hd)[:, :2 * heads], pos)
    q, k = qkv.view(rows, 3, heads, hd)[:, 0], qkv.view(rows, 3, heads, hd)[:, 1]
    assert torch.equal(both, torch.cat([rope(q, pos), rope(k, pos)], dim=1))


def official_rotate(x, pos):
    """Literal transcription of the official V-JEPA 2 rotate_queries_or_keys: x [B, heads, N, D], pos [N] ids.
    (The official code also squeezes the last dim of emb_sin/emb_cos before repeat, a no-op for D/2 > 1.)"""
    B, num_heads, N, D = x.size()
    omega = torch.arange(D // 2, dtype=x.dtype, device=x.device)
    omega /= D / 2.0
    omega = 1.0 / 10000**omega
    freq = torch.einsum("..., f -> ... f", pos, omega)
    emb_sin = freq.sin()
    emb_cos = freq.cos()
    emb_sin = emb_sin.repeat(1, 1, 1, 2)
    emb_cos = emb_cos.repeat(1, 1, 1, 2)
    y = x.unflatten(-1, (-1, 2))
    y1, y2 = y.unbind(dim=-1)
    y = torch.stack((-y2, y1), dim=-1)
    y = y.flatten(-2)
    return (x * emb_cos) + (y * emb_sin)


def official_rope(x, pos):
    """The official RoPEAttention's rotation of q ([B, heads, N, hd] here [1, heads, rows, hd]) by t, h, w."""
    q = x.permute(1, 0, 2)[None]
    head_dim = q.shape[-1]
    d_dim = int(2 * ((head_dim // 3) // 2))
    t, h, w = pos[:, 0], pos[:, 1], pos[:, 2]  # integer ids, as separate_positions gives them
    s = 0
    qd = official_rotate(q[..., s:s + d_dim], pos=t)
    s += d_dim
    qh = official_rotate(q[..., s:s + d_dim], pos=h)
    s += d_dim
    qw = official_rotate(q[..., s:s + d_dim], pos=w)
    s += d_dim
    q = torch.cat([qd, qh, qw, q[..., s:]], dim=-1) if s < head_dim else torch.cat([qd, qh, qw], dim=-1)
    return q[0].permute(1, 0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("hd", [4, 8, 32, 64, 80, 88])
def test_reference_is_the_official_code_bit_for_bit(hd, dtype):
    """Same ops in the same dtypes: equal bits, in x's dtype (bf16 angles for a bf16 x, as the official code)."""
    x = torch.randn(33, 3, hd, generator=torch.Generator().manual_seed(hd)).to(dtype)
    pos = make_positions(33, "cpu", seed=hd + 1)
    ref, official = rope_reference(x, pos), official_rope(x, pos)
    assert ref.dtype == official.dtype == dtype
    assert torch.equal(ref, official)
    if dtype != torch.float16:  # CPU autocast refuses fp16 tensors in einsum (the official code's too)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(rope_reference(x, pos), official_rope(x, pos))


def element_formula(x, pos, tiled=True):
    """The op from its definition, element by element in fp64: theta_j = p * omega_(j mod half) (tiled, as the
    official code), or p * omega_(j // 2) (interleaved, the 'fixed' variant the checkpoints were not trained with)."""
    hd = x.shape[-1]
    d = 2 * ((hd // 3) // 2)
    half = d // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    j = torch.arange(d)
    out = x.double().clone()
    for a in range(3):
        theta = pos[:, a, None].double() * omega[j % half if tiled else j // 2]  # [rows, d]
        cos, sin = theta.cos()[:, None], theta.sin()[:, None]
        y = x[..., a * d:(a + 1) * d].double()
        even, odd = y[..., 0::2], y[..., 1::2]
        out[..., a * d:(a + 1) * d:2] = even * cos[..., 0::2] - odd * sin[..., 0::2]
        out[..., a * d + 1:(a + 1) * d:2] = odd * cos[..., 1::2] + even * sin[..., 1::2]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_tiled_frequency_quirk(device):
    """hd = 80, d = 26, half = 13: the pair (12, 13) of each slice turns by omega_12 and omega_0, not omega_6."""
    x = torch.randn(7, 2, 80, generator=torch.Generator().manual_seed(60)).to(device)
    pos = make_positions(7, device, seed=61)
    pos[0] = torch.tensor([5, 3, 11])
    out, ref = rope(x, pos), rope_reference(x, pos)
    want = element_formula(x.cpu(), pos.cpu())
    assert_close(out.double().cpu(), want, torch.float32, 4.0)
    assert_close(ref.double().cpu(), want, torch.float32, 4.0)
    assert (element_formula(x.cpu(), pos.cpu(), tiled=False) - want).abs().max() > 0.1

    # Unit vectors on element 12 and 13 of the t slice, at t = 5: the pair's two columns of the 2x2 block.
    omega = 1.0 / 10000 ** (torch.arange(13, dtype=torch.float64) / 13)
    e = torch.zeros(2, 1, 80, device=device)
    e[0, 0, 12] = e[1, 0, 13] = 1.0
    p = torch.tensor([[5, 0, 0], [5, 0, 0]], device=device)
    cols = rope(e, p)[:, 0, 12:14].double().cpu()
    block = torch.tensor([[(5 * omega[12]).cos(), (5 * omega[0]).sin()],
                          [-(5 * omega[12]).sin(), (5 * omega[0]).cos()]], dtype=torch.float64)
    torch.testing.assert_close(cols, block, rtol=0, atol=1e-6)
    assert (block[0, 1] - (5 * omega[6]).sin()).abs() > 0.5  # the interleaved variant's sin(theta_13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 2, 8), (2, 1, 80), (3, 2, 9), (2, 2, 4)], ids=str)
def test_gradcheck_fp64(shape, device):
    on_gpu_only_for(device, shape[2] in (80, 9))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(70), dtype=torch.float64).to(device)
    pos = make_positions(shape[0], device, seed=71)
    assert torch.autograd.gradcheck(lambda a: rope(a, pos), (x.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_fp64(device):
    """The backward is the transposed op through the same autograd Function, so it is differentiable too."""
    x = torch.randn(3, 2, 80, generator=torch.Generator().manual_seed(72), dtype=torch.float64).to(device)
    pos = make_positions(3, device, seed=73)
    assert torch.autograd.gradgradcheck(lambda a: rope(a, pos), (x.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hd", [8, 9, 64, 80, 4])
def test_every_element_written(hd, dtype, device):
    """Outputs start as NaN (poison_empty): position 0 must give x back exactly (cos 0 = 1, sin 0 = 0), the gradient
    g back exactly, and at any position the copied tail must equal x's."""
    on_gpu_only_for(device, hd in (9, 64, 80))
    x = torch.randn(33, 3, hd, generator=torch.Generator().manual_seed(hd)).to(device, dtype).requires_grad_()
    zero = torch.zeros(33, 3, dtype=torch.int64, device=device)
    out = rope(x, zero)
    assert torch.equal(out, x.detach())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(hd + 1)).to(device, dtype)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], g)
    out = rope(x, make_positions(33, device, seed=hd + 2))
    assert torch.isfinite(out).all()
    d = 2 * ((hd // 3) // 2)
    assert torch.equal(out[..., 3 * d:], x.detach()[..., 3 * d:])
    assert torch.isfinite(torch.autograd.grad(out, x, g)[0]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_rows(device):
    x = torch.zeros(0, 3, 64, device=device, requires_grad=True)
    out = rope(x, torch.zeros(0, 3, dtype=torch.int64, device=device))
    assert out.shape == (0, 3, 64)
    assert torch.autograd.grad(out.sum(), x)[0].shape == (0, 3, 64)


def _bad_inputs(device):
    x = torch.zeros(7, 3, 64, device=device)
    pos = torch.zeros(7, 3, dtype=torch.int64, device=device)
    return [
        ((x[0], pos), ValueError, r"rope: x must be 3-D, got shape \[3, 64\]"),
        ((x.long(), pos), TypeError, r"rope: x has dtype torch.int64"),
        ((x.tolist(), pos), TypeError, r"rope: x must be a torch.Tensor, got list"),
        ((x[..., :1], pos), ValueError, r"rope: x has shape \[7, 3, 1\], expected \[rows, heads, hd\] with hd >= 2"),
        ((x, pos.float()), TypeError, r"rope: pos has dtype torch.float32, expected one of \['torch.int32', "
                                      r"'torch.int64'\]"),
        ((x, pos[:, 0]), ValueError, r"rope: pos must be 2-D, got shape \[7\]"),
        ((x, pos[:, :2]), ValueError, r"rope: pos has shape \[7, 2\], expected \[rows=7, 3\]"),
        ((x, pos[:6]), ValueError, r"rope: pos has shape \[6, 3\], expected \[rows=7, 3\]"),
        ((x, pos.to("meta")), ValueError, r"rope: pos is on meta, expected"),
        ((x.to("meta"), pos.to("meta")), RuntimeError, r"rope: x is on meta; the Triton kernels run on CUDA tensors"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_name_the_argument(case, device):
    args, error, match = _bad_inputs(device)[case]
    with pytest.raises(error, match=match):
        rope(*args)


def test_grid_positions():
    """t-major, then row, then column ids on a T x 3 x 4 grid; any integer dtype and shape (flattened in order)."""
    ids = torch.tensor([[0, 3, 4, 11], [12, 17, 23, 29]])
    want = [[0, 0, 0], [0, 0, 3], [0, 1, 0], [0, 2, 3], [1, 0, 0], [1, 1, 1], [1, 2, 3], [2, 1, 1]]
    for dtype in (torch.int64, torch.int32):
        got = grid_positions(ids.to(dtype), height=3, width=4)
        assert got.dtype == torch.int32 and got.tolist() == want
    # The official separate_positions arithmetic on every id of a 2 x 3 x 4 grid.
    ids = torch.arange(24)
    frame = ids // 12
    height = (ids - 12 * frame) // 4
    width = (ids - 12 * frame) - 4 * height
    assert torch.equal(grid_positions(ids, 3, 4), torch.stack([frame, height, width], dim=1).int())


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(3), 2, 2), TypeError, r"grid_positions: token_ids has dtype torch.float32, expected an integer"),
    (([0, 1], 2, 2), TypeError, r"grid_positions: token_ids must be a torch.Tensor, got list"),
    ((torch.zeros(3, dtype=torch.int64), 0, 2), ValueError, r"grid_positions: height must be a positive int, got 0"),
    ((torch.zeros(3, dtype=torch.int64), 2, 2.0), ValueError, r"grid_positions: width must be a positive int"),
], ids=["float_ids", "list", "zero_height", "float_width"])
def test_grid_positions_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        grid_positions(*args)
