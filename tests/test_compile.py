"""The custom ops trace under torch.compile: a small block built from them compiles on CPU
without graph breaks and matches eager, forward and backward."""
import torch

import fastllm


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = fastllm.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.rms = fastllm.nn.RMSNorm(d)

    def forward(self, x, residual):
        h = self.proj(self.ln(x))
        y, s = fastllm.add_rms_norm(h, residual, self.rms.weight, 1e-6)
        return fastllm.softmax(self.rms(y) @ s.transpose(-1, -2), dim=-1)


def test_block_compiles_and_matches_eager():
    torch.manual_seed(0)
    block = Block(32)
    x = torch.randn(2, 5, 32, requires_grad=True)
    r = torch.randn(2, 5, 32)
    eager = block(x, r)
    eager.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    out = compiled(x, r)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, gx, atol=1e-5, rtol=1e-5)
