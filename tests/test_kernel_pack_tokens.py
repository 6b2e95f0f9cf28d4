"""kernels.pack_tokens against its PyTorch reference: packed rows, cu_seqlens, grads of x and pos, input errors."""
import pytest
import torch

from vjepa_fast.kernels import pack_tokens, pack_tokens_reference
from helpers import KERNEL_DEVICES as DEVICES
from helpers import KERNEL_LARGE_SHAPES as LARGE
from helpers import KERNEL_SMALL_SHAPES as SMALL

pytestmark = pytest.mark.usefixtures("poison_empty")

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


def make_inputs(batch, tokens, dim, ks, dtype, device, seed, pos=True, unique=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64)
    p = torch.randn(tokens, dim, generator=g, dtype=torch.float64) if pos else None
    if unique:  # unsorted, distinct within a row; masks overlap
        idx = [torch.stack([torch.randperm(tokens, generator=g)[:k] for _ in range(batch)]) for k in ks]
    else:
        idx = [torch.randint(0, tokens, (batch, k), generator=g) for k in ks]
    to = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return to(x), to(p), [i.to(device) for i in idx]


def check_against_reference(x, pos, idx, seed):
    """Forward, cu_seqlens and the grads of every input that requires grad, against the fp64 reference."""
    tol = TOL[x.dtype]
    packed, cu = pack_tokens(x, idx, pos)
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, pos) if t is not None]
    ref, ref_cu = pack_tokens_reference(inputs64[0], idx, inputs64[1] if pos is not None else None)
    assert packed.dtype == (x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype))
    torch.testing.assert_close(packed.double(), ref, **tol)
    assert cu.dtype == torch.int32 and cu.device == x.device
    torch.testing.assert_close(cu, ref_cu)
    wants = [t for t in (x, pos) if t is not None and t.requires_grad]
    if wants:
        g = torch.randn(packed.shape, generator=torch.Generator().manual_seed(seed)).to(packed.device, packed.dtype)
        grads = torch.autograd.grad(packed, wants, g)
        ref_grads = torch.autograd.grad(ref, [t for t in inputs64 if t.requires_grad], g.double())
        for got, want, t in zip(grads, ref_grads, wants):
            assert got.dtype == t.dtype and got.shape == t.shape
            torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SMALL, ids=str)
def test_small_shapes(shape, dtype, with_pos, device):
    x, pos, idx = make_inputs(*shape, dtype, device, seed=SMALL.index(shape), pos=with_pos)
    x.requires_grad_()
    if pos is not None:
        pos.requires_grad_()
    check_against_reference(x, pos, idx, seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", LARGE, ids=str)
def test_large_shapes(shape, dtype, device):
    x, pos, idx = make_inputs(*shape, dtype, device, seed=2)
    x.requires_grad_()
    pos.requires_grad_()
    check_against_reference(x, pos, idx, seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_indices_within_a_mask_accumulate(device):
    x, pos, idx = make_inputs(3, 7, 64, (20, 9), torch.float32, device, seed=4, unique=False)
    check_against_reference(x.requires_grad_(), pos.requires_grad_(), idx, seed=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_grad,pos_grad", [(False, True), (False, False)], ids=["pos_only", "no_grad"])
def test_grad_of_pos_alone_and_no_grad(x_grad, pos_grad, device):
    x, pos, idx = make_inputs(2, 7, 192, (4, 6), torch.float32, device, seed=6)
    check_against_reference(x.requires_grad_(x_grad), pos.requires_grad_(pos_grad), idx, seed=7)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_x_with_fp32_pos_promotes_like_torch(device):
    x, pos, idx = make_inputs(2, 7, 64, (3, 5), torch.bfloat16, device, seed=8)
    check_against_reference(x.requires_grad_(), pos.float().requires_grad_(), idx, seed=9)


@pytest.mark.parametrize("device", DEVICES)
def test_cu_seqlens_layout(device):
    x, _, idx = make_inputs(2, 7, 64, (3, 5), torch.float32, device, seed=10, pos=False)
    _, cu = pack_tokens(x, idx)
    assert cu.tolist() == [0, 3, 6, 11, 16]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x, pos, idx = make_inputs(2, 5, 4, (3, 4), torch.float64, device, seed=11, unique=False)
    assert torch.autograd.gradcheck(lambda a, b: pack_tokens(a, idx, b)[0],
                                    (x.requires_grad_(), pos.requires_grad_()), fast_mode=True)


def _bad_inputs(device):
    x = torch.zeros(2, 7, 64, device=device)
    idx = [torch.zeros(2, 3, dtype=torch.int64, device=device)]
    return [
        ((x[0], idx), ValueError, r"pack_tokens: x must be 3-D, got shape \[7, 64\]"),
        ((x.long(), idx), TypeError, r"x has dtype torch.int64"),
        ((x, idx, torch.zeros(6, 64, device=device)), ValueError, r"pos has shape \[6, 64\], expected \[N=7, D=64\]"),
        ((x, idx[0]), TypeError, r"idx_list must be a non-empty list"),
        ((x, []), TypeError, r"idx_list must be a non-empty list .* of length 0"),
        ((x, [idx[0].int()]), TypeError, r"idx_list\[0\] has dtype torch.int32"),
        ((x, [idx[0], idx[0][:1]]), ValueError, r"idx_list\[1\] has shape \[1, 3\], expected \[B=2, K\] with K >= 1"),
        ((x, [idx[0][:, :0]]), ValueError, r"idx_list\[0\] has shape \[2, 0\]"),
        ((x, [idx[0].to("meta")]), ValueError, r"idx_list\[0\] is on meta, expected"),
        ((x.to("meta"), idx), RuntimeError, r"x is on meta; the Triton kernels run on CUDA tensors"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_name_the_argument(case, device):
    args, error, match = _bad_inputs(device)[case]
    with pytest.raises(error, match=match):
        pack_tokens(*args)
