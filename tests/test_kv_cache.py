"""The runtime's KV caches (fastllm/runtime/kv_cache.py): the paged pool's block bookkeeping (reserve, release,
the scratch block, first_rows views) and writes landing where the ops read. Model-level prefill/decode through
both layouts is tested in test_llama.py against full recomputation."""
import pytest
import torch

from fastllm.reference.decode_attention import cache_index
from fastllm.runtime.kv_cache import SCRATCH_BLOCK, PagedKVCache, StaticKVCache

LAYERS, HEADS, DIM = 2, 3, 4


def paged(batch=3, max_len=10, block_size=4, num_blocks=6):
    return PagedKVCache(LAYERS, batch, HEADS, max_len, DIM, torch.float32, "cpu", None, None,
                        block_size=block_size, num_blocks=num_blocks)


def test_reserve_and_release_account_for_every_block():
    c = paged()                                               # 5 usable blocks, rows of at most 3 blocks
    assert c.block_table.shape == (3, 3) and (c.block_table == SCRATCH_BLOCK).all()
    assert c.reserve(0, 5) and c.owned[0] == [1, 2]
    assert c.reserve(0, 3) and c.owned[0] == [1, 2]           # already enough: nothing changes
    assert c.reserve(1, 9) and c.owned[1] == [3, 4, 5]
    assert c.block_table.tolist() == [[1, 2, 0], [3, 4, 5], [0, 0, 0]]
    assert not c.reserve(2, 1) and c.owned[2] == [] and c.free == []   # pool empty: refused, nothing taken
    c.lengths[1] = 7
    c.release(1)
    assert c.lengths[1] == 0 and c.block_table[1].tolist() == [0, 0, 0] and sorted(c.free) == [3, 4, 5]
    assert c.reserve(2, 10) and c.owned[2] == [3, 4, 5]      # lowest free blocks first
    c.release(0, device=False)                                # host only: the table row is left as it was
    assert c.block_table[0].tolist() == [1, 2, 0] and sorted(c.free) == [1, 2]
    assert c.reserve(0, 4) and c.block_table[0].tolist() == [1, 0, 0]   # reserve rewrites the whole row
    owned = sorted(b for row in c.owned for b in row)
    assert sorted(owned + c.free) == list(range(1, 6))        # every block is owned once or free, none lost


def test_write_lands_where_the_ops_read():
    c = paged()
    c.reserve(2, 10)
    c.reserve(0, 6)
    rows, pos = torch.tensor([2, 2, 0, 2]), torch.tensor([0, 9, 5, 4])
    k, v = torch.randn(4, HEADS, DIM), torch.randn(4, HEADS, DIM)
    c.write(1, rows, pos, k, v)
    blocks, slots = cache_index(pos, rows, c.block_table, c.block_size)
    torch.testing.assert_close(c.k[1][blocks, slots], k, rtol=0, atol=0)
    torch.testing.assert_close(c.v[1][blocks, slots], v, rtol=0, atol=0)
    assert c.k[0].abs().sum() == 0 and c.k[1][SCRATCH_BLOCK].abs().sum() == 0


def test_first_rows_views_share_storage_and_pool():
    c = paged()
    view = c.first_rows(2)
    assert view.block_table.shape == (2, 3) and view.k.data_ptr() == c.k.data_ptr()
    assert c.reserve(1, 4)
    assert view.block_table[1, 0] == c.owned[1][0]
    s = StaticKVCache(LAYERS, 3, HEADS, 8, DIM, torch.float32, "cpu", None, None)
    sv = s.first_rows(2)
    assert sv.k.shape[1] == 2 and sv.block_table is None and sv.lengths.data_ptr() == s.lengths.data_ptr()


@pytest.mark.parametrize("kwargs,match", [(dict(block_size=0), "block_size"), (dict(num_blocks=1), "num_blocks"),
                                          (dict(block_size=True), "block_size")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged(**kwargs)
    c = paged()
    with pytest.raises(ValueError, match="at most 10 positions"):
        c.reserve(0, 11)
    with pytest.raises(ValueError, match="row must be in"):
        c.reserve(3, 1)
    with pytest.raises(ValueError, match="n must be in"):
        c.first_rows(0)
