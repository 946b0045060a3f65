"""The host emulation of CUDA (csrc/emulation/cuda_emulation.h), one primitive at a time, through
the test-only kernels of csrc/emulation/emulation_selftest.cpp: shared memory with __syncthreads,
every warp shuffle against the CUDA programming guide's semantics, atomicAdd, returned threads,
thread/block indices, and the launch and mask misuses a GPU would reject."""

import pytest
import torch

from bayesdiff_ext import emulation

WARP = 32


def _run(kernel, x, block, grid=1, arg=0, width=WARP):
    return emulation.load().emulation_selftest(kernel, x, list(block), grid, arg, width)


@pytest.mark.parametrize("n", [1, 31, 1000, 4097])
@pytest.mark.parametrize("block, grid", [((64, 1, 1), 1), ((96, 1, 1), 3), ((32, 4, 2), 2)])
def test_block_reduction_with_shared_memory_shuffles_and_atomics(n, block, grid):
    x = torch.randn(n, dtype=torch.float64)
    total = _run("block_sum", x, block, grid)
    torch.testing.assert_close(total, x.sum().reshape(1), rtol=1e-12, atol=1e-12)


def _shuffle_source(kind, lane, arg, width):
    """The lane whose value `lane` receives, as the CUDA programming guide defines each shuffle."""
    in_segment = lane % width
    if kind == "shfl_down":
        return lane + arg if in_segment + arg < width else lane
    if kind == "shfl_up":
        return lane - arg if in_segment >= arg else lane
    if kind == "shfl_xor":
        source = (lane ^ arg) % WARP
        return lane if source // width > lane // width else source  # never from a later segment
    return lane // width * width + arg % width


@pytest.mark.parametrize("kind", ["shfl_down", "shfl_up", "shfl_xor", "shfl_idx"])
@pytest.mark.parametrize("arg, width", [(1, 32), (5, 32), (3, 8), (16, 16), (9, 4), (31, 32), (0, 2)])
def test_shuffles_follow_cuda_semantics(kind, arg, width):
    threads = 80  # two full warps and a partial one of 16 lanes
    x = torch.arange(threads, dtype=torch.float64) + 0.5
    out = _run(kind, x, (threads, 1, 1), arg=arg, width=width)
    checked = 0
    for t in range(threads):
        warp_base = t // WARP * WARP
        source = warp_base + _shuffle_source(kind, t % WARP, arg, width)
        if source < threads:  # a lane that does not exist gives an undefined value on a GPU too
            assert out[t] == x[source], (kind, arg, width, t)
            checked += 1
    assert checked >= 64


def test_shuffle_width_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="width must be a power of two"):
        _run("shfl_down", torch.zeros(32, dtype=torch.float64), (32, 1, 1), arg=1, width=12)


@pytest.mark.parametrize("block, grid", [((256, 1, 1), 3), ((8, 4, 2), 2), ((1000, 1, 1), 1)])
def test_syncthreads_orders_shared_memory(block, grid):
    threads = block[0] * block[1] * block[2]
    x = torch.randn(grid * threads, dtype=torch.float64)
    out = _run("reverse", x, block, grid)
    assert torch.equal(out, x.view(grid, threads).flip(1).flatten())


@pytest.mark.parametrize("threads, stay", [(64, 2), (64, 40), (96, 64)])
def test_returned_threads_leave_barriers_and_shuffles(threads, stay):
    x = torch.randn(threads, dtype=torch.float64)
    out = _run("early_exit", x, (threads, 1, 1), arg=stay).view(stay, 2)
    neighbour = x[(torch.arange(stay) + 1) % stay]
    assert torch.equal(out[:, 0], neighbour) and torch.equal(out[:, 1], neighbour + 1)


def test_atomic_add_loses_no_update():
    block, grid, repeats = (256, 1, 1), 3, 1000
    counts = _run("atomic_add", torch.zeros(1, dtype=torch.float64), block, grid, arg=repeats)
    # double, float, unsigned long long, int, unsigned: every one of 768000 additions arrives
    # (exact in float: below 2^24).
    assert counts.tolist() == [grid * block[0] * repeats] * 5


@pytest.mark.parametrize("block, grid", [((4, 3, 2), 3), ((8, 4, 2), 2)])
def test_thread_and_block_indices(block, grid):
    out = _run("thread_index", torch.zeros(1, dtype=torch.float64), block, grid)
    rows = []
    for b in range(grid):
        for z in range(block[2]):
            for y in range(block[1]):
                for x in range(block[0]):
                    linear = x + block[0] * (y + block[1] * z)
                    rows.append([b, x, y, z, grid, *block, linear // WARP * WARP])
    assert torch.equal(out, torch.tensor(rows, dtype=torch.float64))


def test_partial_mask_shuffle_is_refused_not_deadlocked():
    with pytest.raises(RuntimeError, match="every live lane must take part"):
        _run("partial_mask", torch.zeros(64, dtype=torch.float64), (64, 1, 1))


@pytest.mark.parametrize(
    "block, grid, message",
    [
        ((33, 33, 1), 1, "at most 1024 threads"),
        ((1, 1, 65), 1, "z <= 64"),
        ((0, 1, 1), 1, "block"),
        ((32, 1, 1), 0, "grid"),
    ],
)
def test_launch_configurations_a_gpu_rejects(block, grid, message):
    with pytest.raises(ValueError, match=message):
        _run("block_sum", torch.zeros(4, dtype=torch.float64), block, grid)
