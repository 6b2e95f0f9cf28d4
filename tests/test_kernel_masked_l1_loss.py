"""kernels.masked_l1_loss against its PyTorch reference: loss value, grad of pred, loss_exp, eps, input errors."""
import pytest
import torch
import torch.nn.functional as F

from vjepa_fast.kernels import masked_l1_loss, masked_l1_loss_reference
from helpers import KERNEL_DEVICES as DEVICES
from helpers import KERNEL_LARGE_SHAPES as LARGE
from helpers import KERNEL_SMALL_SHAPES as SMALL

pytestmark = pytest.mark.usefixtures("poison_empty")

# The loss is accumulated and returned in fp32 for both input dtypes; the bf16 gradient is rounded to bf16.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-9}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-9}}


def make_inputs(batch, tokens, dim, ks, dtype, device, seed, eps=1e-5, scale=1.0, unique=True):
    """target with per-row scale and shift; pred = normalised target rows +- (0.05 .. 1.05), so that no |pred -
    target| is near 0, where the sign (hence the gradient) would depend on rounding."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    target = (torch.randn(batch, tokens, dim, generator=g, dtype=torch.float64) * scale * (0.5 + rand(batch, tokens, 1))
              + rand(batch, tokens, 1) * 4 - 2).to(dtype)
    if unique:
        idx = [torch.stack([torch.randperm(tokens, generator=g)[:k] for _ in range(batch)]) for k in ks]
    else:
        idx = [torch.randint(0, tokens, (batch, k), generator=g) for k in ks]
    norm = F.layer_norm(target.double(), (dim,), eps=eps)
    rows = torch.arange(batch)[:, None]
    gathered = torch.cat([norm[rows, i].reshape(-1, dim) for i in idx])
    offset = (0.05 + rand(gathered.shape)) * torch.where(rand(gathered.shape) < 0.5, -1.0, 1.0)
    pred = (gathered + offset).to(dtype)
    return pred.to(device), target.to(device), [i.to(device) for i in idx]


def check_against_reference(pred, target, idx, eps=1e-5, loss_exp=1.0, grad_scale=2.5):
    loss = masked_l1_loss(pred.requires_grad_(), target, idx, eps=eps, loss_exp=loss_exp)
    pred64 = pred.detach().double().requires_grad_()
    ref = masked_l1_loss_reference(pred64, target.double(), idx, eps=eps, loss_exp=loss_exp)
    expected_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == expected_dtype and loss.device == pred.device
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)
    (grad,) = torch.autograd.grad(loss * grad_scale, pred)
    (ref_grad,) = torch.autograd.grad(ref * grad_scale, pred64)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL[pred.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SMALL, ids=str)
def test_small_shapes(shape, dtype, device):
    check_against_reference(*make_inputs(*shape, dtype, device, seed=SMALL.index(shape)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", LARGE, ids=str)
def test_large_shapes(shape, dtype, device):
    check_against_reference(*make_inputs(*shape, dtype, device, seed=20))


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_indices(device):
    check_against_reference(*make_inputs(3, 7, 64, (20, 9), torch.float32, device, seed=21, unique=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_exp", [2.0, 1.5])
def test_loss_exp(loss_exp, device):
    check_against_reference(*make_inputs(2, 7, 192, (3, 7, 5), torch.float32, device, seed=22), loss_exp=loss_exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_eps_inside_the_sqrt_of_the_biased_variance(eps, device):
    """Target variance (~1e-6) below eps: where eps goes and which variance is used both change the loss."""
    check_against_reference(*make_inputs(2, 7, 64, (5, 3), torch.float32, device, seed=23, eps=eps, scale=1e-3),
                            eps=eps)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_difference_has_zero_gradient(device):
    """Constant target rows normalise to exactly 0; with pred 0 every difference is 0 and sign(0) = 0."""
    target = torch.full((2, 7, 64), 0.75, device=device)
    idx = [torch.tensor([[0, 3], [6, 1]], device=device)]
    pred = torch.zeros(4, 64, device=device, requires_grad=True)
    loss = masked_l1_loss(pred, target, idx)
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    pred, target, idx = make_inputs(2, 5, 8, (3, 2), torch.float64, device, seed=24)
    assert torch.autograd.gradcheck(lambda p: masked_l1_loss(p, target, idx), (pred.requires_grad_(),),
                                    fast_mode=True)


def _bad_inputs(device):
    target = torch.zeros(2, 7, 64, device=device)
    idx = [torch.zeros(2, 3, dtype=torch.int64, device=device)]
    pred = torch.zeros(6, 64, device=device)
    return [
        ((pred, target[0], idx), ValueError, r"masked_l1_loss: target must be 3-D, got shape \[7, 64\]"),
        ((pred[:5], target, idx), ValueError,
         r"pred has shape \[5, 64\], expected \[sum_i B\*K_i=6, D=64\] for target \[2, 7, 64\] and masks of K=\[3\]"),
        ((pred[:, :32], target, idx), ValueError, r"pred has shape \[6, 32\]"),
        ((pred.long(), target, idx), TypeError, r"pred has dtype torch.int64"),
        ((pred, target.clone().requires_grad_(), idx), ValueError, r"target requires grad"),
        ((pred, target, [idx[0][:1]]), ValueError, r"idx_list\[0\] has shape \[1, 3\], expected \[B=2, K\]"),
        ((pred.to("meta"), target, idx), ValueError, r"pred is on meta, expected"),
        ((pred, target, idx, 1e-5, 0.5), ValueError, r"loss_exp must be >= 1, got 0.5"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_name_the_argument(case, device):
    args, error, match = _bad_inputs(device)[case]
    with pytest.raises(error, match=match):
        masked_l1_loss(*args)
