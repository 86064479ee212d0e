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


# ----------------------------------------------------------------------------
# Any exception of the first call demotes (issue 27, hole 1)


def first_contact_warnings(caught):
    return [str(w.message) for w in caught if "first-contact" in str(w.message)]


def test_a_launch_error_demotes_triton_with_one_warning_and_chunked_answers(triton_ops, monkeypatch):
    # What a GPU says when a configuration asks for more registers than it has: the
    # interpreter's launch raises it here, on the first call of the class.
    from triton.runtime import interpreter

    inputs = make_inputs(**TINY, seed=40)
    margin = MARGINS["arcface"]
    expected_loss, expected_grad = loss_and_grad(inputs, margin, "chunked")
    first_contact.reset()

    def no_launch(self, *args, **kwargs):
        raise RuntimeError("CUDA error: too many resources requested for launch\nCUDA kernel errors might be ...")

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", no_launch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grad = loss_and_grad(inputs, margin, "triton")  # the backward of the first call too
    (message,) = first_contact_warnings(caught)
    assert "backend 'triton' failed on cpu" in message and "its first call raised RuntimeError: CUDA error: too " \
        "many resources requested for launch." in message and "run 'chunked' instead" in message, message
    assert "might be" not in message  # the first line only
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    outcome = [o for o in first_contact.outcomes() if o.backend == "triton"][0]
    assert outcome.status == "demoted" and outcome.fallback == "chunked" and outcome.comparator is None
    assert outcome.reason == "RuntimeError: CUDA error: too many resources requested for launch"
    assert "too many resources requested for launch" in dcq_ops.backends("cpu")["triton"]
    # The class stays demoted: no second warning, chunked's numbers.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again, again_grad = loss_and_grad(inputs, margin, "triton")
    torch.testing.assert_close(again, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(again_grad, expected_grad, rtol=0, atol=0)


def _compilation_error():
    import ast

    from triton.compiler.errors import CompilationError
    return CompilationError("def queue_pass_kernel(...): ...", ast.parse("x").body[0], "shared memory overflow")


@pytest.mark.parametrize("error", ["compilation", "ptxas", "out_of_resources"])
def test_a_compile_error_demotes_triton(triton_ops, monkeypatch, error):
    # Triton compiles a kernel at its first run (JITFunction.run; the interpreter's
    # InterpretedFunction.run here): a front-end error, a ptxas failure, or a
    # configuration that does not fit this GPU's shared memory.
    from triton.runtime import errors, interpreter

    raised = {"compilation": _compilation_error, "ptxas": lambda: errors.PTXASError("ptxas fatal : Unresolved "
                                                                                     "extern function 'x'"),
              "out_of_resources": lambda: errors.OutOfResources(262144, 232448, "shared memory")}[error]

    def no_compile(self, *args, **kwargs):
        raise raised()

    inputs = make_inputs(**TINY, seed=41)
    margin = MARGINS["cosface_filtered"]
    expected, _ = loss_and_grad(inputs, margin, "chunked")
    first_contact.reset()
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", no_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = loss_and_grad(inputs, margin, "triton")
    (message,) = first_contact_warnings(caught)
    name = type(raised()).__name__
    assert f"its first call raised {name}:" in message, message
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert name in dcq_ops.backends("cpu")["triton"]


def test_an_exception_of_chunked_demotes_it_to_the_reference(monkeypatch):
    inputs = make_inputs(seed=42)
    margin = MARGINS["cosface"]
    expected_loss, expected_grad = loss_and_grad(inputs, margin, "reference")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(chunked, "dcq_cross_entropy", broken)
    with pytest.warns(RuntimeWarning, match="its first call raised RuntimeError: CUDA error: no kernel image"):
        loss, grad = loss_and_grad(inputs, margin, "chunked")
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "demoted" and outcome.fallback == "reference"


def test_bad_input_still_raises_and_interrupts_and_out_of_memory_are_not_swallowed(monkeypatch):
    x, k, y, w, yq = make_inputs(seed=43)
    with pytest.raises(ValueError, match="embeddings"):  # validation, before any backend runs
        dcq_ops.dcq_cross_entropy(x[:, :10], k, y, w, yq, backend="chunked")
    with pytest.raises(TypeError):
        dcq_ops.dcq_cross_entropy(x, k, y.float(), w, yq, backend="chunked")
    for error in (KeyboardInterrupt(), torch.OutOfMemoryError("CPU out of memory (test)")):
        def raising(*args, error=error, **kwargs):
            raise error

        with monkeypatch.context() as patch:
            patch.setattr(chunked, "dcq_cross_entropy", raising)
            with pytest.raises(type(error)):
                loss_and_grad((x, k, y, w, yq), MARGINS["cosface"], "chunked")
    assert first_contact.outcomes() == [] and demotions() == []


# ----------------------------------------------------------------------------
# Classes keyed on the launch plan; every row of the last row block compared (hole 4)


def corrupt_last_partial_block(monkeypatch, module, name, block, which):
    """Replace ``module.name`` (a (loss, grad) function of the embeddings first) by one whose
    loss is off on the row ``which`` of the last row block, only when that block is partial."""
    original = getattr(module, name)

    def wrong(embeddings, *args, **kwargs):
        loss, grad = original(embeddings, *args, **kwargs)
        rows = embeddings.shape[0]
        if rows % block:
            loss = loss.clone()
            loss[rows - rows % block + which] += 0.25
        return loss, grad

    monkeypatch.setattr(module, name, wrong)


def test_a_wrong_row_tail_of_chunked_is_caught_in_an_already_checked_bucket(monkeypatch):
    # 36 rows: register blocks of 6 rows, no tail. 40 rows (same power-of-two bucket, once
    # unchecked): a tail of 4 rows whose second row is wrong, not among the 16 spread rows.
    margin = MARGINS["arcface"]
    corrupt_last_partial_block(monkeypatch, chunked, "dcq_cross_entropy", 6, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss_and_grad(make_inputs(rows=36, seed=44), margin, "chunked")
    assert 37 not in first_contact.check_rows(40, "cpu").tolist()  # the spread alone misses it
    inputs = make_inputs(rows=40, seed=45)
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'chunked' failed"):
        loss, _ = loss_and_grad(inputs, margin, "chunked")
    expected, _ = loss_and_grad(inputs, margin, "reference")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert [o.status for o in first_contact.outcomes()] == ["passed", "demoted"]


def test_a_wrong_row_tail_of_triton_is_caught_in_an_already_checked_bucket(triton_ops, monkeypatch):
    # BLOCK_M = 16 in the interpreter: 48 rows fill three row blocks; 45 rows (same bucket,
    # N <= 64) leave a last block of 13 rows, whose second row the kernel gets wrong here.
    margin = MARGINS["cosface"]
    tiny = dict(TINY, rows=48)
    corrupt_last_partial_block(monkeypatch, triton_ops, "forward", 16, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss_and_grad(make_inputs(**tiny, seed=46), margin, "triton")
    assert 33 not in first_contact.check_rows(45, "cpu").tolist()
    inputs = make_inputs(**dict(tiny, rows=45), seed=47)
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'triton' failed") as caught:
        loss, _ = loss_and_grad(inputs, margin, "triton")
    assert len(first_contact_warnings(caught)) == 1
    expected, _ = loss_and_grad(inputs, margin, "chunked")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    statuses = [(o.backend, o.status) for o in first_contact.outcomes()]
    assert ("triton", "demoted") in statuses and statuses[0] == ("triton", "passed")
    assert "launch plan (13, 16" in [o for o in first_contact.outcomes() if o.status == "demoted"][0].shape_class


def test_the_split_plan_is_part_of_the_class(triton_ops):
    from dcq_ops.triton import launch

    # Same rows, same power-of-two queue bucket, another split of the queue or queue tail.
    a, b = (launch.launch_plan(20, slots, 16, torch.float32, True, torch.device("cpu")) for slots in (300, 400))
    assert (a.num_splits, a.queue_tail) != (b.num_splits, b.queue_tail)
    x, k, _, w, _ = make_inputs(rows=20, dim=16, slots=400)
    config = first_contact.MarginConfig(**MARGINS["cosface"])
    keys = {first_contact.shape_class("triton", x, k, w[:slots], config, True) for slots in (300, 400)}
    assert len(keys) == 2


def test_the_sm90_kernel_asked_for_is_part_of_the_class(triton_ops, monkeypatch):
    # Each DCQ_OPS_SM90_KERNEL launches another kernel: its first call is checked on its own.
    from dcq_ops.triton import hopper_launch

    x, k, _, w, _ = make_inputs(rows=20, dim=16, slots=300)
    config = first_contact.MarginConfig(**MARGINS["cosface"])
    keys = set()
    for kernel in hopper_launch.CHOICES:
        monkeypatch.setenv("DCQ_OPS_SM90_KERNEL", kernel)
        keys.add(first_contact.shape_class("triton", x, k, w, config, True))
    assert len(keys) == len(hopper_launch.CHOICES)


# ----------------------------------------------------------------------------
# The float64 loss decides, the queue read in blocks (holes 2 and 3)


def test_the_float64_loss_matches_the_reference_in_float64():
    for name, margin in MARGINS.items():
        x, k, y, w, yq = make_inputs(seed=48)
        x[2, 0] = float("nan")
        w[7, 1] = float("inf")
        yq[::5] = y[0]  # row 0 excludes many slots
        config = first_contact.MarginConfig(**margin)
        xd = x.double().requires_grad_(True)
        expected = reference.loss_rows(xd, k.double(), y, w.double(), yq, config)
        expected_grad = torch.autograd.grad(expected.sum(), xd)[0]
        loss, grad = row_check.exact_loss_and_grad(x, k, y, w, yq, config, True, block_slots=16)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    yq[:] = -1  # every slot empty: loss 0, gradient 0
    loss, grad = row_check.exact_loss_and_grad(x, k, y, w, yq, config, True)
    assert torch.equal(loss[torch.isfinite(loss)], torch.zeros_like(loss[torch.isfinite(loss)]))


def test_the_check_never_copies_the_whole_queue():
    # The largest tensor the comparison allocates: a block of the queue, never a copy of all
    # of it (the old check converted the whole queue for the reference: 4 K D bytes here).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = torch.utils._pytree.tree_leaves((args, kwargs))
            seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:  # not a view
                    Largest.bytes = max(Largest.bytes, t.untyped_storage().nbytes())
            return out

    x, k, y, w, yq = make_inputs(rows=20, dim=32, slots=200_000, num_classes=5000, seed=49)
    original = first_contact._verdict

    def watched(*args, **kwargs):
        with Largest():
            return original(*args, **kwargs)

    first_contact._verdict = watched
    torch.set_num_threads(2)  # the float64 loss runs on one thread, and gives the others back
    try:
        loss_and_grad((x, k, y, w, yq), MARGINS["cosface"], "chunked")
    finally:
        first_contact._verdict = original
    assert torch.get_num_threads() == 2
    assert first_contact.outcomes()[0].status == "passed"
    queue_bytes = w.numel() * w.element_size()
    assert 0 < Largest.bytes <= row_check.EXACT_BLOCK_BYTES["cpu"] < queue_bytes / 2, (Largest.bytes, queue_bytes)


# ----------------------------------------------------------------------------
# An extension built for another torch (issue 27, hole 1): reported with the fix, never a crash

_FAILING_EXTENSION = r"""
import importlib.abc, importlib.machinery, sys, warnings

class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "dcq_ops._C":
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise {error}

sys.meta_path.insert(0, Broken())
import torch
import dcq_ops
print("ERROR:", dcq_ops.EXTENSION_ERROR)
print("CHUNKED:", dcq_ops.backends("cpu")["chunked"])
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 16, generator=g, requires_grad=True)
w = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # auto's fallback to the reference warns
    loss = dcq_ops.dcq_cross_entropy(x, torch.randn(8, 16, generator=g), torch.arange(8), w, torch.arange(40) % 11)
    loss.backward()
    queue = dcq_ops.ClassQueue(40, 16)
    queue.enqueue(torch.randn(8, 16, generator=g), torch.arange(8))
print("LOSS:", float(loss), bool(torch.isfinite(x.grad).all()))
"""


@pytest.mark.parametrize("error", [
    'ImportError("/site-packages/dcq_ops/_C.abi3.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")',
    'OSError("libc10_cuda.so: cannot open shared object file: No such file or directory")',
    'RuntimeError("Tried to register an operator (dcq_ops::dcq_cross_entropy) with the same name and overload '
    'name multiple times")',
], ids=["undefined_symbol", "oserror", "registration"])
def test_an_extension_that_does_not_load_is_reported_with_the_fix_and_never_crashes(error):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", _FAILING_EXTENSION.replace("{error}", error)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    kind = error.split("(")[0]
    assert f"could not be loaded ({kind}: " in out, out
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in out, out
    if kind != "ImportError" or "undefined symbol" in error:
        assert "built against another torch" in out, out
    assert "CHUNKED: unavailable: the compiled extension" in out, out
    assert "LOSS:" in out and out.strip().endswith("True"), out


# ----------------------------------------------------------------------------
# The sharded queue's partials and finalize (hole 4), through the hook that
# dcq_ops.parallel.sharded calls on each rank (here: rank 1 of 2, one process)


def sharded_call(kernels, inputs, other_rows=11, compute_grad=True):
    """sharded_partials for rank 1 of two ranks: the gathered rows are rank 0's (random)
    then this rank's; the queue is this rank's shard."""
    from dcq_ops.first_contact_sharded import sharded_partials
    from dcq_ops.parallel.strategy import Batch

    x, k, y, w, yq = inputs
    g = torch.Generator().manual_seed(99)
    others = torch.randn(other_rows, x.shape[1], generator=g, dtype=x.dtype)
    gathered = torch.cat([others, x])
    gathered_labels = torch.cat([torch.randint(0, 60, (other_rows,), generator=g), y])
    batch = Batch(x, y, k, rank=1, world=2, capacity=x.shape[0], compute_grad=compute_grad)
    return sharded_partials(kernels, gathered, gathered_labels, w, yq, batch, other_rows)


def test_sharded_partials_and_finalize_are_checked_once():
    from dcq_ops.loss_kernels import LossKernels

    kernels = LossKernels(first_contact.MarginConfig(**MARGINS["arcface"]), "chunked")
    inputs = make_inputs(seed=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        part, used = sharded_call(kernels, inputs)
        sharded_call(kernels, make_inputs(seed=51))
    assert used is kernels
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "passed" and outcome.comparator == "float64"
    assert outcome.shape_class.startswith("sharded partials and finalize")
    # What the hook returned is the partials of every gathered row, as the backend computes them.
    x, k, y, w, yq = inputs
    expected = chunked.partials(torch.cat([torch.zeros(11, x.shape[1]), x])[11:], y, w, yq, kernels.margin, True)
    torch.testing.assert_close(part.row_sum[11:], expected[1], rtol=1e-5, atol=1e-6)


def test_wrong_sharded_partials_are_caught(monkeypatch):
    from dcq_ops.loss_kernels import LossKernels

    original = chunked.dcq_cross_entropy_partials

    def wrong(*args, **kwargs):
        row_max, row_sum, acc = original(*args, **kwargs)
        return row_max, row_sum * 1.2, acc

    monkeypatch.setattr(chunked, "dcq_cross_entropy_partials", wrong)
    kernels = LossKernels(first_contact.MarginConfig(**MARGINS["cosface"]), "chunked")
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'chunked' failed on cpu for sharded "
                                            "partials and finalize.*No other backend can run it here"):
        sharded_call(kernels, make_inputs(seed=52))
    (outcome,) = first_contact.outcomes()
    assert outcome.status == "failed" and "loss error" in outcome.reason


def test_a_sharded_triton_failure_demotes_to_chunked(triton_ops, monkeypatch):
    from triton.runtime import interpreter

    from dcq_ops.loss_kernels import LossKernels

    def no_launch(self, *args, **kwargs):
        raise RuntimeError("CUDA error: misaligned address")

    kernels = LossKernels(first_contact.MarginConfig(**MARGINS["cosface"]), "triton")
    inputs = make_inputs(**TINY, seed=53)
    expected, _ = sharded_call(LossKernels(kernels.margin, "chunked"), inputs)
    first_contact.reset()
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", no_launch)
    with pytest.warns(RuntimeWarning, match="its first call raised RuntimeError: CUDA error: misaligned address"):
        part, used = sharded_call(kernels, inputs)
    assert used.backend == "chunked"
    torch.testing.assert_close(part.row_sum, expected.row_sum, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, again = sharded_call(kernels, inputs)  # the class stays demoted
    assert again.backend == "chunked"
    assert "sharded partials and finalize" in dcq_ops.backends("cpu")["triton"]


def test_a_compiled_call_of_an_unchecked_class_warns_once_and_warmup_covers_it():
    margin = MARGINS["cosface"]
    inputs = make_inputs(rows=9, seed=54)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: dcq_ops.dcq_cross_entropy(*t, **margin, reduction="none", backend="chunked"),
                             backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(*inputs)
            compiled(*make_inputs(rows=12, seed=55))  # another trace: said once only
    said = [str(w.message) for w in caught if "torch.compile graph" in str(w.message)]
    assert len(said) == 1 and "DCQLoss.prepare" in said[0], said
    assert first_contact.outcomes() == []  # nothing could be checked there
    first_contact.reset()
    torch._dynamo.reset()
    dcq_ops.warmup([9], 45, 203, margin=first_contact.MarginConfig(**margin), backend="chunked", training=False,
                   evaluation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            compiled(*inputs)
    torch._dynamo.reset()


def test_a_compiled_enqueue_that_raises_falls_back_to_plain_pytorch_once(monkeypatch):
    import dataclasses
    import importlib

    backends = importlib.import_module("dcq_ops.backends")  # the module (dcq_ops.backends is the function)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setitem(backends.BACKENDS, "chunked", dataclasses.replace(backends.BACKENDS["chunked"],
                                                                          enqueue=broken))
    g = torch.Generator().manual_seed(56)
    queue, expected = dcq_ops.ClassQueue(30, 8), dcq_ops.ClassQueue(30, 8)
    batches = [(torch.randn(7, 8, generator=g), torch.randint(0, 50, (7,), generator=g)) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="compiled queue enqueue failed on its first call on cpu .RuntimeError: "
                                            "CUDA error: no kernel image"):
        queue.enqueue(*batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for batch in batches[1:]:
            queue.enqueue(*batch)
    assert len(calls) == 1  # tried once
    for batch in batches:
        backends.BACKENDS["reference"].entry("enqueue")(expected.weights, expected.labels, expected.ptr,
                                                        batch[0], batch[1])
    assert torch.equal(queue.weights, expected.weights) and torch.equal(queue.labels, expected.labels)
    assert int(queue.ptr) == int(expected.ptr) == 21
    assert "its queue enqueue failed on its first call (RuntimeError" in dcq_ops.backends("cpu")["chunked"]


def test_the_triton_launch_plan_is_what_the_queue_pass_launches(triton_ops):
    from dcq_ops.triton import launch

    for rows, slots in ((5, 40), (21, 300), (48, 1000), (45, 129)):
        x, _, y, w, yq = make_inputs(rows=rows, dim=16, slots=slots, num_classes=12, empty=3, seed=rows)
        q = torch.nn.functional.normalize(x, dim=1)
        plan = launch.launch_plan(rows, slots, 16, torch.float32, True, torch.device("cpu"))
        workspace = launch.queue_pass(q, y, w, yq, 50.0, 0.0, True)
        assert workspace.num_splits == plan.num_splits, (rows, slots, plan)
        assert plan.last_row_block == rows - (rows - 1) // plan.block_m * plan.block_m
        assert plan.queue_tail == (slots - (plan.num_splits - 1) * plan.split_size) % plan.align
