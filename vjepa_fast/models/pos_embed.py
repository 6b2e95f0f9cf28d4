"""Fixed 3D sin-cos position embeddings, exactly as the official V-JEPA code builds them."""
import math

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] as [sin(pos*omega), cos(pos*omega)], omega_i = 1/10000^(i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_3d(dim: int, grid_depth: int, grid_size: int, uniform_power: bool = True) -> torch.Tensor:
    """[grid_depth*grid_size^2, dim] float32 embedding; tokens in t-major, then h, then w order.

    With `uniform_power` each of the (d, h, w) parts has dim 2*ceil(dim/6) and the concatenation is cut
    to `dim`; otherwise d gets dim/2 and h, w get dim/4 each.
    """
    if uniform_power:
        d_dim = h_dim = w_dim = 2 * math.ceil(dim / 6)
    else:
        d_dim, h_dim, w_dim = dim // 2, dim // 4, dim // 4
    # on the CPU whatever the default device: the same table on every device
    d, h, w = torch.meshgrid(*(torch.arange(n, device="cpu") for n in (grid_depth, grid_size, grid_size)),
                             indexing="ij")
    emb = torch.cat([sincos_1d(d_dim, d), sincos_1d(h_dim, h), sincos_1d(w_dim, w)], dim=1)
    return emb[:, :dim].float()
