"""Shared test fixtures."""

import contextlib

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The golden models' tensors are tiny: intra-op threads only add synchronisation,
    which becomes seconds per step when the 2 cores are shared with other jobs.
    Integer results do not depend on the thread count. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def fp32_big_products():
    """Every test module starts with vision / prefill products in float32 and the native
    bf16 attention kernel. ``dsvl2.load`` applies this machine's kernel choice process-wide
    (``model/native/policy.py``: bf16 products on CPUs with AMX or AVX-512 BF16 where a
    measurement says they are faster, and torch's attention kernel where it measured faster),
    which would leak from one module into the next and make results depend on the test
    order. Within a module the choice stays as its own loads set it (a module-scoped
    fixture's answers and its tests' are computed alike). Restored afterwards."""
    from dsvl2.model import ops

    before = ops.big_products_in_weights_dtype(), ops.attention_kernel
    ops.set_big_products_in_weights_dtype(False)
    ops.attention_kernel = "native"
    yield
    ops.set_big_products_in_weights_dtype(before[0])
    ops.attention_kernel = before[1]


@pytest.fixture
def bf16_policy():
    """Vision / prefill products in bf16 for one test (the policy of CPUs with bf16 units)."""
    from dsvl2.model import ops

    before = ops.big_products_in_weights_dtype()
    ops.set_big_products_in_weights_dtype(True)
    yield
    ops.set_big_products_in_weights_dtype(before)


@pytest.fixture
def script():
    """``script(ids, then=None)``: scripted answers through the real engine. Every engine
    without a sampler of its own (``model.engine``, the one the CLI or a server loads)
    samples ``ids``, one per step, then ``then`` at every step (None: the model's own
    choice, ``sample_next``), through ``dsvl2.engine.seams.use_sampler`` until the test
    ends. One request at a time; a later call replaces the script."""
    from dsvl2.engine.sampling import sample_next
    from dsvl2.engine.seams import use_sampler

    with contextlib.ExitStack() as stack:

        def install(ids, then: int | None = None):
            it = iter(list(ids))

            def scripted(logits, params, generators, seen=None):
                assert logits.shape[0] == 1, "scripted runs hold one request"
                tok = next(it, then)
                if tok is None:
                    return sample_next(logits, params, generators, seen)
                return torch.tensor([tok], device=logits.device)

            stack.enter_context(use_sampler(scripted))

        yield install
