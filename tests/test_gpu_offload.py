"""fastopt.torch.CPUOffload on a CUDA device (marked gpu; skipped without one): real side
streams, pinned host buffers and the worker thread, compared with fastopt.torch's own CUDA
optimizer on the same model (the CPU and CUDA kernels run the same float32 math; fused
multiply-adds can differ in the last bit, hence a tolerance)."""

import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import fastopt.torch as fot  # noqa: E402
from fastopt import schedules  # noqa: E402

pytestmark = pytest.mark.gpu


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 10)).to("cuda", dtype)


def _train(m, opt, steps, clip=None):
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(32, 64, device="cuda", generator=g, dtype=next(m.parameters()).dtype)
        m(x).float().square().mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype,master_weights,in_backward", [
    (torch.float32, "fp32", False), (torch.float32, "fp32", True),
    (torch.bfloat16, "fp32", False), (torch.bfloat16, "remainder", True)])
def test_offload_equals_the_cuda_optimizer(dtype, master_weights, in_backward):
    kwargs = dict(lr=schedules.warmup(schedules.cosine(1e-2, 20), 3), weight_decay=0.1,
                  master_weights=master_weights)
    m, ref = _model(dtype), _model(dtype)
    opt = fot.CPUOffload(m.parameters(), "AdamW", bucket_elements=20000,
                         step_in_backward=in_backward, **kwargs)
    assert opt._buckets[0][0].host._buckets[0][0].flat.is_pinned()
    _train(m, opt, 20)
    _train(ref, fot.AdamW(ref.parameters(), **kwargs), 20)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert p.is_cuda and p.dtype == dtype
        torch.testing.assert_close(p, q, **tol)


def test_offload_clipping_on_the_device_and_a_side_stream_model():
    """max_grad_norm (norm on the device) equals clip_grad_norm_; a forward on a non-default
    stream sees the updated params."""
    m, ref = _model(torch.float32), _model(torch.float32)
    opt = fot.CPUOffload(m.parameters(), "AdamW", lr=1e-2, max_grad_norm=0.1,
                         bucket_elements=30000)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        _train(m, opt, 10)
    torch.cuda.synchronize()
    _train(ref, fot.AdamW(ref.parameters(), lr=1e-2), 10, clip=0.1)
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_offload_keeps_the_state_off_the_device_and_drops_gradients_in_backward():
    """Peak GPU memory of a step: the optimizer without offload keeps AdamW's 8 B/param of
    state on the device; CPUOffload none, and with step_in_backward the gradients do not all
    exist at once either."""
    def peak(make):
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
        opt = make(m)
        x = torch.randn(16, 1024, device="cuda")
        for _ in range(2):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), sum(p.numel() for p in m.parameters())

    plain, n = peak(lambda m: fot.AdamW(m.parameters(), lr=1e-3))
    offload, _ = peak(lambda m: fot.CPUOffload(m.parameters(), "AdamW", lr=1e-3,
                                                bucket_elements=1 << 20))
    in_backward, _ = peak(lambda m: fot.CPUOffload(m.parameters(), "AdamW", lr=1e-3,
                                                    bucket_elements=1 << 20,
                                                    step_in_backward=True))
    assert plain - offload >= 7 * n  # (the 8 B/param of state, less allocator slack)
    assert offload - in_backward >= 2 * n  # (most of the 4 B/param of gradients)
