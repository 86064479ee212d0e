"""The first-contact check (dcq_ops.first_contact): the first call of a fused backend for
a shape class is compared with an independent backend within difference_bound; a
deliberately perturbed backend is caught, warned about once with the numbers, and
replaced by its fallback for that call and every later one; the check runs once per
shape class, never after; DCQ_OPS_SKIP_FIRST_CONTACT=1 skips it. The triton path runs
under Triton's interpreter on tiny shapes."""

import os
import warnings

import pytest
import torch

import dcq_ops
from dcq_ops import first_contact, reference, rounding_bound, row_check
from dcq_ops.backends import demotions
from dcq_ops.margin import MarginConfig
from dcq_ops.ops import chunked
from inputs import MARGINS, make_inputs

# Triton decides between interpreter and compiler when it is first imported: as
# tests/test_triton.py, import the ops for the interpreter now, before any test imports
# Triton (torch.compile does); TRITON_INTERPRET is set for that import only.
_TRITON_OPS = None
if not torch.cuda.is_available():
    from dcq_ops.triton import import_ops

    try:
        _TRITON_OPS = import_ops(interpret=True)
    except ImportError:
        pass

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=dcq_ops.EXTENSION_ERROR or "no extension")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test starts with nothing checked and no demotion, and leaves it so."""
    monkeypatch.delenv(first_contact.SKIP_ENV, raising=False)
    first_contact.reset()
    yield
    first_contact.reset()


@pytest.fixture
def checks(monkeypatch):
    """The number of comparisons the check has run (each compares the fused rows with another backend)."""
    calls = []
    original = first_contact.slice_loss_and_grad

    def counted(backend, *args, **kwargs):
        calls.append(backend)
        return original(backend, *args, **kwargs)

    monkeypatch.setattr(first_contact, "slice_loss_and_grad", counted)
    return calls


def loss_and_grad(inputs, margin, backend):
    x, k, y, w, yq = inputs
    x = x.detach().clone().requires_grad_(True)
    loss = dcq_ops.dcq_cross_entropy(x, k, y, w, yq, **margin, reduction="none", backend=backend)
    (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def perturb_chunked(monkeypatch, loss_shift=0.0, grad_shift=0.0, row=None):
    """Replace chunked's op by one whose loss rows (and gradient rows) are off."""
    original = chunked.dcq_cross_entropy

    def wrong(*args, **kwargs):
        loss, grad = original(*args, **kwargs)
        rows = slice(None) if row is None else slice(row, row + 1)
        loss = loss.clone()
        loss[rows] += loss_shift
        if grad.shape[0]:
            grad = grad.clone()
            grad[rows] += grad_shift
        return loss, grad

    monkeypatch.setattr(chunked, "dcq_cross_entropy", wrong)


# ----------------------------------------------------------------------------
# chunked (the CPU's production path): checked against the reference


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("dtype,queue_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float16), (torch.float64, None)],
                         ids=["fp32", "bf16_queue", "fp16_queue", "fp64"])
def test_a_correct_backend_passes_with_no_warning(name, dtype, queue_dtype):
    # No false alarm on any margin and dtype: the bound is rigorous to first order.
    for seed in range(2):
        first_contact.reset()
        inputs = make_inputs(dtype=dtype, queue_dtype=queue_dtype, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss, _ = loss_and_grad(inputs, MARGINS[name], "chunked")
        (outcome,) = first_contact.outcomes()
        assert outcome.status == "passed" and outcome.comparator == "float64", outcome
        assert outcome.loss_error <= outcome.loss_bound and outcome.grad_error <= outcome.grad_bound
        assert outcome.rows_compared == first_contact.CHECK_ROWS
    assert "demoted" not in dcq_ops.backends("cpu")["chunked"]


def test_the_check_runs_once_per_shape_class(checks):
    margin = MARGINS["arcface"]
    loss_and_grad(make_inputs(rows=37, seed=1), margin, "chunked")
    assert checks == ["float64"]
    for seed in range(3):  # the same launch plan: no check, ever again
        loss_and_grad(make_inputs(rows=37, seed=10 + seed), margin, "chunked")
    assert checks == ["float64"]
    loss_and_grad(make_inputs(rows=65, seed=2), margin, "chunked")  # another row tail: another class
    with torch.no_grad():  # no gradient: another kernel, another class
        dcq_ops.dcq_cross_entropy(*make_inputs(rows=37, seed=3), **margin, backend="chunked")
    assert checks == ["float64"] * 3
    assert [o.status for o in first_contact.outcomes()] == ["passed"] * 3


def test_a_wrong_loss_is_caught_warned_once_and_replaced_by_the_reference(monkeypatch):
    inputs = make_inputs(seed=4)
    margin = MARGINS["cosface"]
    expected_loss, expected_grad = loss_and_grad(inputs, margin, "reference")
    perturb_chunked(monkeypatch, loss_shift=0.05)
    with pytest.warns(RuntimeWarning, match=r"first-contact check of backend 'chunked' failed on cpu") as caught:
        loss, grad = loss_and_grad(inputs, margin, "chunked")
    (warning,) = [w for w in caught if "first-contact" in str(w.message)]
    text = str(warning.message)
    assert "loss error 5.000e-02 > bound" in text and "queue float32, N=37, K=203, D=45" in text, text
    assert "run 'reference' instead" in text
    # The call itself returned the reference's result, loss and gradient.
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # Later calls of the class: the reference, with no new warning and no new check.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, again_grad = loss_and_grad(inputs, margin, "chunked")
        auto, _ = loss_and_grad(inputs, margin, "auto")
    torch.testing.assert_close(again, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(again_grad, expected_grad, rtol=0, atol=0)
    torch.testing.assert_close(auto, expected_loss, rtol=0, atol=0)
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "demoted" and outcome.fallback == "reference"
    assert outcome.loss_error == pytest.approx(0.05, rel=1e-4) and outcome.loss_error > outcome.loss_bound
    report = dcq_ops.backends("cpu")["chunked"]
    assert report.startswith("available; demoted by the first-contact check for 1 shape class") and \
        "-> 'reference' (loss error 5.000e-02 > bound" in report, report
    # Another shape class is checked on its own (and caught too: the op is still wrong).
    with pytest.warns(RuntimeWarning, match="first-contact"):
        loss_and_grad(make_inputs(rows=100, seed=5), margin, "chunked")
    assert len(demotions("cpu")) == 2


def test_a_wrong_gradient_alone_is_caught(monkeypatch):
    inputs = make_inputs(seed=6)
    margin = MARGINS["arcface"]
    perturb_chunked(monkeypatch, grad_shift=0.05, row=0)  # row 0 is always among the rows compared
    with pytest.warns(RuntimeWarning, match=r"gradient error .* > bound .*L2 norm"):
        loss_and_grad(inputs, margin, "chunked")
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "demoted" and outcome.grad_error > outcome.grad_bound
    assert outcome.loss_error <= outcome.loss_bound  # the loss itself was right


def test_the_bound_decides_an_error_just_above_it_fails_and_just_below_passes(monkeypatch):
    # Row 0's loss off by 2x, then 0.5x, the bound the check computes for it.
    inputs = make_inputs(seed=7, queue_dtype=torch.bfloat16)
    margin = MARGINS["arcface"]
    config = MarginConfig(**margin)
    x, k, y, w, yq = inputs
    index = first_contact.check_rows(x.shape[0], "cpu")
    picked = (x[index], k[index], y[index], w, yq)
    ref_loss, ref_grad = first_contact.slice_loss_and_grad("float64", *picked, config, True)
    roundings = (rounding_bound.gemm_rounding("chunked", x.dtype, w.dtype, k.dtype), row_check.EXACT)
    bound, _, _ = rounding_bound.difference_bound(*picked, config, roundings, ref_loss, ref_grad)
    fused_loss, _ = first_contact.slice_loss_and_grad("chunked", *picked, config, True)
    error_0 = (fused_loss[0].double() - ref_loss[0].double()).item()
    for factor, demoted in ((2.0, True), (0.5, False)):
        first_contact.reset()
        with monkeypatch.context() as patch:
            # Move row 0 to ref + factor * bound (in the direction away from the reference).
            perturb_chunked(patch, loss_shift=factor * bound[0].item() - error_0, row=0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss_and_grad(inputs, margin, "chunked")
        (outcome,) = first_contact.outcomes()
        assert (outcome.status == "demoted") == demoted, (factor, outcome)
        assert any("first-contact" in str(c.message) for c in caught) == demoted


def test_a_nan_where_the_reference_is_finite_is_caught(monkeypatch):
    inputs = make_inputs(seed=8)
    perturb_chunked(monkeypatch, loss_shift=float("nan"), row=0)
    with pytest.warns(RuntimeWarning, match="1 row\\(s\\) non-finite on one backend only"):
        loss, _ = loss_and_grad(inputs, MARGINS["cosface"], "chunked")
    assert torch.isfinite(loss).all()


def test_non_finite_input_rows_agree_and_pass():
    x, k, y, w, yq = make_inputs(seed=9)
    x[0, 3] = float("nan")  # row 0's loss is NaN on every backend: that agreement passes
    w[5, 0] = float("inf")  # and a queue slot: NaN for the rows that keep it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss, _ = loss_and_grad((x, k, y, w, yq), MARGINS["arcface"], "chunked")
    assert torch.isnan(loss[0])
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "passed" and outcome.rows_compared < first_contact.CHECK_ROWS


def test_the_environment_variable_skips_the_check(monkeypatch, checks):
    monkeypatch.setenv(first_contact.SKIP_ENV, "1")
    inputs = make_inputs(seed=10)
    perturb_chunked(monkeypatch, loss_shift=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss, _ = loss_and_grad(inputs, MARGINS["cosface"], "chunked")
    assert checks == []
    expected, _ = loss_and_grad(inputs, MARGINS["cosface"], "reference")
    torch.testing.assert_close(loss, expected + 0.5)  # what the (wrong) backend said: nothing checked it
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "skipped" and first_contact.SKIP_ENV in outcome.reason
    assert "demoted" not in dcq_ops.backends("cpu")["chunked"]


def test_a_demoted_class_stays_demoted_under_torch_compile(monkeypatch):
    inputs = make_inputs(seed=11)
    margin = MARGINS["cosface"]
    perturb_chunked(monkeypatch, loss_shift=0.5)
    with pytest.warns(RuntimeWarning, match="first-contact"):
        loss_and_grad(inputs, margin, "chunked")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: dcq_ops.dcq_cross_entropy(*t, **margin, reduction="none",
                                                                  backend="chunked"),
                             backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = reference.dcq_cross_entropy(*inputs, **margin, reduction="none")
    x, *rest = inputs
    got = compiled(x.clone().requires_grad_(True), *rest)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------
# warmup and DCQLoss.prepare


def test_warmup_checks_every_class_so_that_training_does_not(checks):
    outcomes = dcq_ops.warmup([37, 8], 45, 203, backend="chunked", evaluation=True)
    assert [o.status for o in outcomes] == ["passed"] * 4  # N<=64 and N<=16, with and without gradient
    assert len(checks) == 4
    loss_and_grad(make_inputs(rows=37, seed=12), MARGINS["cosface"], "chunked")
    with torch.no_grad():
        dcq_ops.dcq_cross_entropy(*make_inputs(rows=8, seed=13), backend="chunked")
    assert len(checks) == 4
    with pytest.raises(ValueError, match=r"batch_sizes\[1\] must be a positive int, got 0"):
        dcq_ops.warmup([4, 0], 45, 203)
    with pytest.raises(TypeError, match="evaluation must be a bool"):
        dcq_ops.warmup([4], 45, 203, evaluation="yes")


def test_dcq_loss_prepare(checks):
    loss_fn = dcq_ops.DCQLoss(None, 45, 400, sample_rate=0.5)
    outcomes = loss_fn.prepare([37, (20, 45)])
    assert [o.status for o in outcomes] == ["passed", "passed"] and len(checks) == 2
    x, k, y, *_ = make_inputs(rows=37, dim=45, num_classes=400, seed=14)
    loss_fn(x.requires_grad_(True), y, k).backward()
    assert len(checks) == 2  # the step was checked before it ran
    assert int(loss_fn.queue.ptr) == 37  # prepare enqueued nothing
    with pytest.raises(ValueError, match="embedding_size"):
        loss_fn.prepare([(8, 46)])


# ----------------------------------------------------------------------------
# triton, under Triton's interpreter (tiny shapes)


@pytest.fixture
def triton_ops(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU, tests/test_cuda.py checks the compiled triton path")
    if _TRITON_OPS is None:
        pytest.skip("Triton is not installed")
    from dcq_ops.triton import kernels
    if not kernels.INTERPRETED:
        pytest.skip("Triton was imported before this module without TRITON_INTERPRET=1 (run this module alone, or "
                    "with TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # for the backend dispatch, and Triton's launches
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")
    return _TRITON_OPS


TINY = dict(rows=5, dim=16, slots=40, num_classes=12, empty=3)


def test_triton_passes_against_chunked(triton_ops, checks):
    inputs = make_inputs(**TINY, seed=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss_and_grad(inputs, MARGINS["arcface"], "triton")
        loss_and_grad(make_inputs(**TINY, seed=16), MARGINS["arcface"], "triton")
    assert checks == ["chunked"]
    (outcome,) = first_contact.outcomes()
    assert outcome.backend == "triton" and outcome.status == "passed" and outcome.comparator == "chunked"


def test_a_wrong_triton_kernel_falls_back_to_chunked(triton_ops, monkeypatch, checks):
    inputs = make_inputs(**TINY, seed=17)
    margin = MARGINS["cosface"]
    expected_loss, expected_grad = loss_and_grad(inputs, margin, "chunked")
    first_contact.reset()
    checks.clear()
    original = triton_ops.forward

    def wrong(*args, **kwargs):
        loss, grad = original(*args, **kwargs)
        return loss * 1.1, grad

    monkeypatch.setattr(triton_ops, "forward", wrong)
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'triton' failed") as caught:
        loss, grad = loss_and_grad(inputs, margin, "triton")
    text = str([w for w in caught if "first-contact" in str(w.message)][0].message)
    assert "compared with 'float64'" in text and "run 'chunked' instead" in text  # the float64 loss decided
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again, _ = loss_and_grad(make_inputs(**TINY, seed=18), margin, "triton")
        expected_again, _ = loss_and_grad(make_inputs(**TINY, seed=18), margin, "chunked")
    torch.testing.assert_close(again, expected_again, rtol=0, atol=0)
    assert "demoted by the first-contact check" in dcq_ops.backends("cpu")["triton"]
    statuses = {(o.backend, o.status) for o in first_contact.outcomes()}
    assert statuses == {("triton", "demoted"), ("chunked", "passed")}  # the fallback was checked too
    assert checks == ["chunked", "float64", "float64"]


def test_triton_right_and_chunked_wrong_the_reference_decides(triton_ops, monkeypatch):
    # The comparator itself is off: triton agrees with the reference, so it is not demoted.
    inputs = make_inputs(**TINY, seed=19)
    perturb_chunked(monkeypatch, loss_shift=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss, _ = loss_and_grad(inputs, MARGINS["cosface"], "triton")
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "passed" and outcome.comparator == "float64"
    expected, _ = loss_and_grad(inputs, MARGINS["cosface"], "reference")
    assert (loss - expected).abs().max() < 1e-4


def test_environment_variable_names_match_the_docs():
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "numerics.md")).read()
    assert first_contact.SKIP_ENV in docs and "python -m dcq_ops.check" in docs


def test_out_of_memory_in_the_comparison_skips_the_check_with_a_warning(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    monkeypatch.setattr(first_contact, "slice_loss_and_grad", no_memory)
    inputs = make_inputs(seed=20)
    with pytest.warns(RuntimeWarning, match="was skipped: out of memory for the comparison .*Tried to allocate"):
        loss, _ = loss_and_grad(inputs, MARGINS["cosface"], "chunked")
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "skipped" and "out of memory" in outcome.reason
    monkeypatch.undo()
    expected, _ = loss_and_grad(inputs, MARGINS["cosface"], "chunked")  # unchecked, the backend's own rows
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert len(first_contact.outcomes()) == 1  # not retried
