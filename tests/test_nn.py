"""Layers and the small CNN: every backward against float64 central differences, the conv
against direct references, the quantized layers against the quantizer pairs composed by
hand, state dicts, bad input, and the NumPy/CuPy seam (docs/derivations.md N1-N10)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.signal import correlate

from mecref import nn, quant, schemes
from mecref.backend import MecrefError, get_xp, to_backend, to_host
from mecref.losses import softmax_cross_entropy, softmax_cross_entropy_backward
from mecref.nn.fused import BatchNormPool


# ----------------------------------------------------------------------------- helpers
def num_grad(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of a (in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def check_layer(layer, x, rtol=1e-6, atol=1e-8, check_x=True):
    """loss = sum(R * layer(x)); compare dx and every param grad with finite differences."""
    rng = np.random.default_rng(7)
    y = layer.forward(x, train=True)
    R = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(R * layer.forward(x, train=True)))

    layer.forward(x, train=True)
    dx = layer.backward(R)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert set(grads) == set(layer.params)
    if check_x:
        np.testing.assert_allclose(dx, num_grad(loss, x), rtol=rtol, atol=atol)
    for k, p in layer.params.items():
        np.testing.assert_allclose(grads[k], num_grad(loss, p), rtol=rtol, atol=atol, err_msg=k)


def conv_reference(x, W, b, stride, padding):
    """Direct cross-correlation with scipy, per (n, f), then subsampled by the stride."""
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    N, F = x.shape[0], W.shape[0]
    out = []
    for n in range(N):
        maps = [correlate(xp_[n], W[f], mode="valid")[0][::stride, ::stride] + b[f] for f in range(F)]
        out.append(maps)
    return np.array(out)


# ----------------------------------------------------------------------------- conv
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_conv_gradients_match_finite_differences(stride, padding, rng):
    layer = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, seed=1).astype(np.float64)
    layer.params["b"][...] = rng.standard_normal(4)
    check_layer(layer, rng.standard_normal((2, 3, 7, 6)))


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
       st.integers(0, 2), st.integers(0, 3), st.integers(0, 2**31 - 1))
@settings(max_examples=15)
def test_conv_gradients_over_random_geometry(C, F, k, stride, padding, extra, seed):
    rng = np.random.default_rng(seed)
    layer = nn.Conv2d(C, F, k, stride=stride, padding=padding, seed=seed).astype(np.float64)
    check_layer(layer, rng.standard_normal((2, C, k + extra, k + 1 + extra)))


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1)])
def test_conv_forward_matches_scipy_correlate(stride, padding, rng):
    layer = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, seed=2)
    layer.params["b"][...] = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((4, 3, 9, 8)).astype(np.float32)
    y = layer.forward(x)
    ref = conv_reference(x.astype(np.float64), layer.params["W"].astype(np.float64),
                         layer.params["b"].astype(np.float64), stride, padding)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.forward(x, train=False), y, rtol=0, atol=0)


@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]),
       st.integers(0, 2), st.integers(0, 3), st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_conv_forward_matches_direct_loop(C, F, k, stride, padding, extra, seed):
    rng = np.random.default_rng(seed)
    H, W = k + extra, k + 2 + extra
    x = rng.standard_normal((2, C, H, W))
    layer = nn.Conv2d(C, F, k, stride=stride, padding=padding, seed=seed).astype(np.float64)
    Wt, b = layer.params["W"], layer.params["b"]
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    ref = np.zeros((2, F, Ho, Wo))
    for h in range(Ho):
        for w in range(Wo):
            patch = xp_[:, :, h * stride:h * stride + k, w * stride:w * stride + k]
            ref[:, :, h, w] = np.tensordot(patch, Wt, axes=([1, 2, 3], [1, 2, 3])) + b
    np.testing.assert_allclose(layer.forward(x), ref, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col(rng):
    """<im2col(x), c> = <x, col2im(c)>, with col2im's offset-major row order."""
    N, C, H, W, k, s, p = 2, 3, 7, 6, 3, 2, 1
    x = rng.standard_normal((N, C, H, W))
    cols = nn.im2col(x, k, s, p)                          # rows (c, i, j)
    c = rng.standard_normal(cols.shape)
    c_offset_major = c.reshape(N, C, k, k, -1).transpose(0, 2, 3, 1, 4).reshape(cols.shape)
    lhs = np.sum(cols * c)
    rhs = np.sum(x * nn.col2im(c_offset_major, x.shape, k, s, p))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


def test_layers_hand_on_channel_major_arrays_and_take_any_layout(rng):
    """Outputs and input gradients are (C, N, H, W) memory seen as (N, C, H, W); an input in
    either layout gives the same numbers (N1, module docstring)."""
    x = rng.standard_normal((3, 2, 6, 6))
    x_cm = np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)     # same values, channel-major
    for make in (lambda: nn.Conv2d(2, 4, 3, padding=1).astype(np.float64),
                 lambda: nn.BatchNorm2d(2).astype(np.float64), lambda: nn.MaxPool2d(relu=True)):
        outs = []
        for xin in (x, x_cm):
            layer = make()
            y = layer.forward(xin, train=True)
            dx = layer.backward(np.ones_like(y))
            assert y.swapaxes(0, 1).flags.c_contiguous and dx.swapaxes(0, 1).flags.c_contiguous
            outs.append((y, dx))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_conv_input_grad_off_skips_dx(rng):
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    y = layer.forward(x)
    layer.input_grad = False
    assert layer.backward(np.ones_like(y)) is None
    assert layer.grads["W"].shape == layer.params["W"].shape


# ----------------------------------------------------------------------------- other layers
def test_linear_gradients(rng):
    layer = nn.Linear(5, 3, seed=3).astype(np.float64)
    check_layer(layer, rng.standard_normal((4, 5)))


def test_relu_gradient(rng):
    x = rng.standard_normal((3, 2, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5                              # stay off the kink
    check_layer(nn.ReLU(), x)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("H,W", [(4, 6), (5, 7)])
def test_maxpool_gradient_no_ties(relu, H, W, rng):
    x = rng.permutation(2 * 3 * H * W).reshape(2, 3, H, W) / 7.0 - 2.0   # distinct values
    check_layer(nn.MaxPool2d(relu=relu), x)


@given(st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1))
def test_maxpool_ties_count_each_window_once(levels, relu, seed):
    """Heavily tied (quantized) input: each window sends its gradient to exactly one entry,
    the first (row-major) maximum; with relu, windows with max <= 0 send none."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-levels, levels + 1, size=(2, 3, 6, 8)).astype(np.float32)
    pool = nn.MaxPool2d(relu=relu)
    y = pool.forward(x)
    dy = rng.uniform(1.0, 2.0, size=y.shape).astype(np.float32)
    dx = pool.backward(dy)
    win = dx.reshape(2, 3, 3, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 4, 4)
    xw = x.reshape(2, 3, 3, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 4, 4)
    first = np.argmax(xw == xw.max(axis=-1, keepdims=True), axis=-1)
    live = (xw.max(axis=-1) > 0) if relu else np.ones(y.shape, bool)
    expect = np.zeros_like(win)
    np.put_along_axis(expect, first[..., None], np.where(live, dy, 0)[..., None], axis=-1)
    np.testing.assert_array_equal(win, expect)
    np.testing.assert_array_equal(y, np.maximum(xw.max(axis=-1), 0) if relu else xw.max(axis=-1))


def test_batchnorm_train_gradients(rng):
    bn = nn.BatchNorm2d(3).astype(np.float64)
    bn.params["gamma"][...] = rng.uniform(0.5, 2.0, 3)
    bn.params["beta"][...] = rng.standard_normal(3)
    check_layer(bn, rng.standard_normal((4, 3, 3, 2)) * 2 + 1, rtol=1e-5, atol=1e-7)


def test_batchnorm_input_gradient_is_blind_to_shift_and_scale(rng):
    """N3: sum_j dx_j = 0, and sum_j dx_j xhat_j = gamma t dgamma eps / (sigma^2 + eps)
    (zero up to eps) per channel, for any dy."""
    bn = nn.BatchNorm2d(3, eps=1e-2).astype(np.float64)
    bn.params["gamma"][...] = [0.5, 1.0, 2.0]
    x = rng.standard_normal((4, 3, 5, 5)) * 3 + 2
    bn.forward(x)
    dx = bn.backward(rng.standard_normal(x.shape))
    var = x.var(axis=(0, 2, 3))
    t = 1 / np.sqrt(var + 1e-2)
    xhat = (x - x.mean(axis=(0, 2, 3), keepdims=True)) * t[:, None, None]
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0, atol=1e-10)
    expect = bn.params["gamma"] * t * bn.grads["gamma"] * 1e-2 / (var + 1e-2)
    np.testing.assert_allclose((dx * xhat).sum(axis=(0, 2, 3)), expect, rtol=1e-8, atol=1e-12)


def test_batchnorm_running_stats_and_eval_mode(rng):
    bn = nn.BatchNorm2d(2, momentum=0.1, eps=1e-5).astype(np.float64)
    bn.params["gamma"][...] = [1.5, 0.5]
    bn.params["beta"][...] = [0.1, -0.2]
    rm, rv = np.zeros(2), np.ones(2)
    for _ in range(3):
        x = rng.standard_normal((5, 2, 3, 3)) * 3 + 2
        bn.forward(x, train=True)
        m = x.mean(axis=(0, 2, 3))
        v = x.var(axis=(0, 2, 3), ddof=1)
        rm, rv = 0.9 * rm + 0.1 * m, 0.9 * rv + 0.1 * v
    np.testing.assert_allclose(bn.buffers["running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], rv, rtol=1e-12)
    x = rng.standard_normal((4, 2, 3, 3))
    ref = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) \
        * np.array([1.5, 0.5])[:, None, None] + np.array([0.1, -0.2])[:, None, None]
    np.testing.assert_allclose(bn.forward(x, train=False), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], rm, rtol=1e-12)  # eval: no update


# ----------------------------------------------------------------------------- BatchNorm + pool in one pass (N11)
def _bn(C, gamma, beta):
    bn = nn.BatchNorm2d(C).astype(np.float64)
    bn.params["gamma"][...] = gamma
    bn.params["beta"][...] = beta
    return bn


@pytest.mark.parametrize("relu", [False, True])
def test_fused_batchnorm_pool_matches_finite_differences(relu, rng):
    """N11's backward against float64 central differences, a channel with gamma < 0 included
    (its windows pool the minimum of x)."""
    pair = BatchNormPool(_bn(3, [1.3, -0.8, 0.6], [0.2, 0.1, -0.3]), nn.MaxPool2d(relu=relu))
    x = rng.permutation(2 * 3 * 4 * 6).reshape(2, 3, 4, 6) / 9.0 - 2.0    # distinct values
    check_layer(pair, x, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("relu", [False, True])
def test_fused_batchnorm_pool_equals_the_two_layers(relu, rng):
    """The fused pass gives what BatchNorm2d then MaxPool2d give: output, input gradient, the
    BatchNorm's gradients and running statistics (float64; only the summation order differs)."""
    gamma, beta = [1.5, -0.7, 2.0, 0.4], [0.1, -0.2, 0.3, -1.0]
    bn, pool = _bn(4, gamma, beta), nn.MaxPool2d(relu=relu)
    pair = BatchNormPool(_bn(4, gamma, beta), nn.MaxPool2d(relu=relu))
    for _ in range(2):                                        # running statistics over two steps
        x = rng.standard_normal((3, 4, 6, 8)) * 2 + 0.5
        y_ref, y = pool.forward(bn.forward(x)), pair.forward(x)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-13)
        dy = rng.standard_normal(y.shape)
        dx_ref, dx = bn.backward(pool.backward(dy)), pair.backward(dy)
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-12)
        for k in ("gamma", "beta"):
            np.testing.assert_allclose(pair.grads[k], bn.grads[k], rtol=1e-12, atol=1e-13, err_msg=k)
        for k in ("running_mean", "running_var"):
            np.testing.assert_allclose(pair.buffers[k], bn.buffers[k], rtol=1e-13, err_msg=k)
    assert pair.forward(x).shape == (3, 4, 3, 4) and y.strides[1] > y.strides[0]   # channel-major


@given(st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1))
def test_fused_batchnorm_pool_routes_ties_like_the_pool(levels, relu, seed):
    """Quantized (heavily tied) input: each window's gradient goes to the same single entry as
    through BatchNorm2d then MaxPool2d, the first (row-major) maximum; none where relu cuts."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-levels, levels + 1, size=(2, 3, 6, 8)).astype(np.float64)
    gamma, beta = rng.uniform(0.5, 2.0, 3) * rng.choice([-1, 1], 3), rng.uniform(-0.5, 0.5, 3)
    bn, pool = _bn(3, gamma, beta), nn.MaxPool2d(relu=relu)
    pair = BatchNormPool(_bn(3, gamma, beta), nn.MaxPool2d(relu=relu))
    y_ref, y = pool.forward(bn.forward(x)), pair.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-13)
    dy = rng.uniform(1.0, 2.0, size=y.shape)
    routed_ref = pool.backward(dy)                            # the gradient BatchNorm receives
    pair.backward(dy)
    xs, win = pair._ws["xs"], pair._ws["win"]                 # planes (C, a, b, N, Ho, Wo)
    routed = np.zeros((3, 2, 3, 2, 4, 2))                     # (C, N, Ho, a, Wo, b)
    for a in (0, 1):
        for b in (0, 1):
            routed[:, :, :, a, :, b] = win[:, a, b] * dy.swapaxes(0, 1)
    np.testing.assert_array_equal(routed.reshape(3, 2, 6, 8).swapaxes(0, 1), routed_ref)
    assert xs.shape == (3, 2, 2, 2, 3, 4)


def test_fused_batchnorm_pool_refuses_what_it_cannot_run(rng):
    pair = BatchNormPool(_bn(2, [1.0, 1.0], [0.0, 0.0]), nn.MaxPool2d(relu=True))
    with pytest.raises(MecrefError, match="train mode only"):
        pair.forward(rng.standard_normal((2, 2, 4, 4)), train=False)
    with pytest.raises(MecrefError, match="even H and W"):
        pair.forward(rng.standard_normal((2, 2, 5, 4)))
    with pytest.raises(MecrefError, match="2 channels"):
        pair.forward(rng.standard_normal((2, 3, 4, 4)))
    with pytest.raises(MecrefError, match="needs a forward"):
        BatchNormPool(_bn(2, [1.0, 1.0], [0.0, 0.0]), nn.MaxPool2d()).backward(np.zeros((2, 2, 2, 2)))
    with pytest.raises(TypeError, match="a BatchNorm2d and a MaxPool2d"):
        BatchNormPool(nn.MaxPool2d(), nn.MaxPool2d())


def test_small_cnn_runs_batchnorm_and_pool_fused_in_train_mode(rng):
    """SmallCNN's train step (fused pairs) equals its layers run one by one; tapping a
    BatchNorm keeps that pair apart; a gradient for a fused BatchNorm's output is refused."""
    model = nn.small_cnn(quantizer="lsq", w_bits=4, a_bits=4, width=(3, 4, 5), num_classes=3,
                         seed=2).astype(np.float64)
    x = rng.standard_normal((4, 1, 8, 8))
    model.forward(x, train=True)                              # quantizer steps initialised
    R = rng.standard_normal((4, 3))
    h = x
    for layer in model.layers:                                # reference: one layer at a time
        h = layer.forward(h, train=True)
    d = R
    for layer in reversed(model.layers):
        d = layer.backward(d)
    ref = {name: layer.grads[key].copy() for name, layer, key in model.named_params()}
    for taps, plan in ((None, [(0,), (1, 2), (3,), (4, 5)]), (("bn1",), [(0,), (1,), (2,), (3,), (4, 5)])):
        out = model.forward(x, train=True, taps=taps)
        assert model._plan[:len(plan)] == plan             # the pairs that ran fused
        np.testing.assert_allclose(out[0], h, rtol=0, atol=1e-12)
        model.backward(R)
        for name, layer, key in model.named_params():
            np.testing.assert_allclose(layer.grads[key], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert out[2]["bn1"].shape == (4, 3, 8, 8)                # the BatchNorm's own output
    model.forward(x, train=True)
    with pytest.raises(MecrefError, match="never formed"):
        model.backward(R, dtaps={"bn2": np.zeros((4, 4, 4, 4))})


def test_global_avg_pool_and_flatten_gradients(rng):
    check_layer(nn.GlobalAvgPool2d(), rng.standard_normal((3, 4, 3, 5)))
    check_layer(nn.Flatten(), rng.standard_normal((3, 2, 2, 3)))


def test_sequential_chains_layers(rng):
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, seed=0), nn.ReLU(), nn.MaxPool2d(),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 4, seed=1)).astype(np.float64)
    x = rng.standard_normal((2, 2, 4, 4))
    R = rng.standard_normal((2, 4))
    net.forward(x)
    net.backward(R)
    for name, layer, key in net.named_params():
        g = layer.grads[key].copy()
        fd = num_grad(lambda: float(np.sum(R * net.forward(x))), layer.params[key])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8, err_msg=name)


# ----------------------------------------------------------------------------- whole network
@pytest.mark.parametrize("path", ["logits", "features", "both"])
def test_small_cnn_end_to_end_gradients(path, rng):
    """Every param gradient of the FP network in float64 on 2 tiny images, through the
    logits (softmax CE), the features (an external dfeatures), or both."""
    model = nn.small_cnn(width=(2, 3, 4), num_classes=3, seed=5).astype(np.float64)
    model.layers[0].input_grad = True
    x = rng.standard_normal((2, 1, 8, 8))
    y = np.array([0, 2])
    R = rng.standard_normal((2, 4))
    w_ce, w_f = (path != "features"), (path != "logits")

    def loss():
        logits, feats = model.forward(x, train=True)
        return w_ce * float(softmax_cross_entropy(logits, y)[0]) + w_f * float(np.sum(R * feats))

    logits, feats = model.forward(x, train=True)
    _, cache = softmax_cross_entropy(logits, y)
    dlogits = softmax_cross_entropy_backward(cache) * w_ce
    dx = model.backward(dlogits, R if w_f else None)
    grads = {name: layer.grads[key].copy() for name, layer, key in model.named_params()}
    np.testing.assert_allclose(dx, num_grad(loss, x), rtol=1e-5, atol=1e-8)
    for name, layer, key in model.named_params():
        np.testing.assert_allclose(grads[name], num_grad(loss, layer.params[key]),
                                   rtol=1e-5, atol=1e-8, err_msg=name)


def test_small_cnn_shapes_config_and_layout():
    model = nn.small_cnn(quantizer="lsq", w_bits=2, a_bits=2, seed=1)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    logits, feats = model.forward(x)
    assert logits.shape == (3, 10) and feats.shape == (3, 64)
    assert logits.dtype == np.float32 and feats.dtype == np.float32
    assert model.backward(np.ones_like(logits)) is None      # images need no gradient
    assert model.names == ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "conv3", "bn3",
                           "relu3", "gap", "fc"]
    assert [l.w_bits for l in model.layers if isinstance(l, nn._FakeQuant)] == [8, 2, 2, 8]
    assert model.layers[0].a_signed and not model.layers[3].a_signed
    clone = nn.small_cnn(**model.config)
    assert clone.config == model.config and isinstance(model.config["width"], list)
    fp = nn.small_cnn(quantizer="ste", w_bits=4, a_bits=4, first_last_bits=32)
    assert type(fp.layers[0]) is nn.Conv2d and type(fp.layers[-1]) is nn.Linear
    assert type(fp.layers[3]) is nn.QuantConv2d


def test_no_decay_and_positive_sets():
    model = nn.small_cnn(quantizer="lsqplus", w_bits=4, a_bits=4, first_last_bits=8)
    decayed = {name for name, layer, key in model.named_params() if key not in layer.no_decay}
    assert decayed == {"conv1.W", "conv2.W", "conv3.W", "fc.W"}
    positive = {name for name, layer, key in model.named_params() if key in layer.positive}
    assert positive == {f"{l}.{k}" for l in ("conv1", "conv2", "conv3", "fc") for k in ("s_w", "s_a")}
    pact = nn.QuantConv2d(2, 3, scheme="dorefa_pact", w_bits=2, a_bits=2)
    assert pact.positive == {"alpha"} and pact.no_decay == {"b", "alpha"}


# ----------------------------------------------------------------------------- quantized layers
def _qrange(bits, signed):
    """(Qn, Qp) written out from Q1: unsigned [0, 2^b - 1], signed [-2^(b-1), 2^(b-1) - 1],
    signed 1 bit the binary {-1, +1}."""
    if not signed:
        return 0, 2 ** bits - 1
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _lsq_step0(x, Qp, axes=None):
    """LSQ's initial step (Esser et al. 2020): s0 = 2 mean|x| / sqrt(Qp)."""
    keep = axes is not None
    return 2 * np.abs(x).mean(axis=axes, keepdims=keep) / np.sqrt(Qp)


def _lsqplus_init0(x, bits, signed, axes=None):
    """LSQ+'s initial values (Bhalgat et al. 2020): unsigned data spans the grid,
    s0 = (max - min) / (Qp - Qn), beta0 = min - Qn s0; signed (symmetric) the 3-sigma rule
    s0 = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1), beta0 = 0."""
    keep = axes is not None
    Qn, Qp = _qrange(bits, signed)
    if signed:
        mu, sigma = x.mean(axis=axes, keepdims=keep), x.std(axis=axes, keepdims=keep)
        s = np.maximum(np.abs(mu - 3 * sigma), np.abs(mu + 3 * sigma)) / 2 ** (bits - 1)
        return s, np.zeros_like(s)
    lo, hi = x.min(axis=axes, keepdims=keep), x.max(axis=axes, keepdims=keep)
    s = (hi - lo) / (Qp - Qn)
    return s, lo - Qn * s


def _by_hand_input(scheme, x, bits, signed):
    """The quantizer pair with the params a fresh layer should pick from x (N9), from the
    papers' rules written above: per tensor, LSQ's gradient scale g = 1/sqrt(N Qp) with N the
    features of one sample; PACT's alpha0 = Qp times LSQ's step; STE's s = max|x| / Qp."""
    _, Qp = _qrange(bits, signed)
    g = 1.0 / np.sqrt((x.size // x.shape[0]) * Qp)
    if scheme == "ste" or (scheme == "dorefa_pact" and signed):
        s = np.abs(x).max() if signed else x.max()
        y, c = quant.ste_quantize(x, s / Qp, bits, signed=signed)
        return y, lambda d: (quant.ste_quantize_backward(c, d), {})
    if scheme == "dorefa_pact":
        alpha = Qp * _lsq_step0(x, Qp)
        y, c = quant.pact_quantize(x, alpha, bits)
        return y, lambda d: (lambda dx, da: (dx, {"alpha": da}))(*quant.pact_quantize_backward(c, d))
    if scheme == "lsq":
        s = _lsq_step0(x, Qp)
        y, c = quant.lsq_quantize(x, s, bits, signed=signed, grad_scale=g)
        return y, lambda d: (lambda dx, ds: (dx, {"s_a": ds}))(*quant.lsq_quantize_backward(c, d))
    s, beta = _lsqplus_init0(x, bits, signed)
    y, c = quant.lsqplus_quantize(x, s, beta, bits, signed=signed, grad_scale=g)
    return y, lambda d: (lambda dx, ds, db: (dx, {"s_a": ds, "beta_a": db}))(
        *quant.lsqplus_quantize_backward(c, d))


def _by_hand_weight(scheme, W, bits):
    """Signed weights, per output channel (N9): STE s = max|W_f| / Qp; LSQ (and LSQ+, which
    keeps weights symmetric) with g = 1/sqrt(N_f Qp), N_f the weights of one channel."""
    _, Qp = _qrange(bits, True)
    axes = tuple(range(1, W.ndim))
    if scheme == "ste":
        s = np.abs(W).max(axis=axes, keepdims=True) / Qp
        y, c = quant.ste_quantize(W, s, bits, signed=True)
        return y, lambda d: (quant.ste_quantize_backward(c, d), {})
    if scheme == "dorefa_pact":
        y, c = quant.dorefa_weight_quantize(W, bits)
        return y, lambda d: (quant.dorefa_weight_quantize_backward(c, d), {})
    s = _lsq_step0(W, Qp, axes) if scheme == "lsq" else _lsqplus_init0(W, bits, True, axes)[0]
    g = 1.0 / np.sqrt(W[0].size * Qp)
    y, c = quant.lsq_quantize(W, s, bits, signed=True, grad_scale=g)
    return y, lambda d: (lambda dw, ds: (dw, {"s_w": ds}))(*quant.lsq_quantize_backward(c, d))


def _compare_to_by_hand(qlayer, plain, x, dy, scheme, w_bits, a_bits, signed):
    W0 = qlayer.params["W"].copy()
    xq, back_x = _by_hand_input(scheme, x, a_bits, signed)
    Wq, back_w = _by_hand_weight(scheme, W0, w_bits)
    plain.params["W"][...] = Wq
    if "b" in plain.params:
        plain.params["b"][...] = qlayer.params["b"]
    y_ref = plain.forward(xq)
    dxq = plain.backward(dy)
    dW, gw = back_w(plain.grads["W"])
    dx, gx = back_x(dxq)
    y = qlayer.forward(x)
    got_dx = qlayer.backward(dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_dx, dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(qlayer.grads["W"], dW, rtol=1e-12, atol=1e-12)
    expected = dict(gw, **gx)
    if "b" in plain.params:
        expected["b"] = plain.grads["b"]
    assert set(qlayer.grads) == set(expected) | {"W"} == set(qlayer.params)
    for k, v in expected.items():
        np.testing.assert_allclose(qlayer.grads[k], np.asarray(v).reshape(qlayer.params[k].shape),
                                   rtol=1e-12, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("scheme", schemes.names())
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w_bits,a_bits", [(3, 4), (1, 2)])
def test_quant_conv_grads_equal_quantizer_pairs_by_hand(scheme, signed, w_bits, a_bits, rng):
    q = nn.QuantConv2d(3, 4, 3, stride=1, padding=1, scheme=scheme, w_bits=w_bits, a_bits=a_bits,
                       a_signed=signed, seed=4).astype(np.float64)
    plain = nn.Conv2d(3, 4, 3, stride=1, padding=1).astype(np.float64)
    x = rng.standard_normal((2, 3, 5, 5))
    if not signed:
        x = np.maximum(x, 0) + 0.01 * rng.random(x.shape)
    dy = rng.standard_normal((2, 4, 5, 5))
    _compare_to_by_hand(q, plain, x, dy, scheme, w_bits, a_bits, signed)


@pytest.mark.parametrize("scheme", schemes.names())
def test_quant_linear_grads_equal_quantizer_pairs_by_hand(scheme, rng):
    q = nn.QuantLinear(6, 3, scheme=scheme, w_bits=2, a_bits=3, seed=5).astype(np.float64)
    plain = nn.Linear(6, 3).astype(np.float64)
    x = np.abs(rng.standard_normal((4, 6)))
    _compare_to_by_hand(q, plain, x, rng.standard_normal((4, 3)), scheme, 2, 3, False)


def test_quant_layer_full_precision_is_the_plain_layer(rng):
    q = nn.QuantConv2d(2, 3, 3, padding=1, scheme="lsq", w_bits=32, a_bits=32, seed=9)
    plain = nn.Conv2d(2, 3, 3, padding=1, seed=9)
    assert set(q.params) == {"W", "b"}
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(q.forward(x), plain.forward(x))
    dy = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(q.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(q.grads["W"], plain.grads["W"])


def test_quant_init_happens_once_and_ste_range_is_an_ema(rng):
    q = nn.QuantConv2d(1, 2, 3, scheme="lsq", w_bits=4, a_bits=4, a_signed=True)
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)
    q.forward(x)
    assert float(q.buffers["ready"]) == 1.0
    q.params["s_a"][...] = 0.123
    q.forward(2 * x)
    assert np.all(q.params["s_a"] == np.float32(0.123))      # not re-initialised
    ste = nn.QuantLinear(3, 2, scheme="ste", w_bits=4, a_bits=4).astype(np.float64)
    x1, x2 = np.abs(rng.standard_normal((4, 3))), 3 * np.abs(rng.standard_normal((4, 3)))
    ste.forward(x1)
    ste.forward(x2)
    expect = 0.9 * x1.max() + 0.1 * x2.max()
    np.testing.assert_allclose(ste.buffers["a_max"], expect, rtol=1e-12)
    ste.forward(10 * x2, train=False)                          # eval: range frozen
    np.testing.assert_allclose(ste.buffers["a_max"], expect, rtol=1e-12)


# ----------------------------------------------------------------------------- state dicts
def _one_step(model, rng, scale=1.0):
    x = rng.standard_normal((4, 1, 12, 12)).astype(np.float32)
    logits, _ = model.forward(x)
    model.backward(np.ones_like(logits))
    for _, layer, key in model.named_params():
        layer.params[key] -= np.float32(0.01 * scale) * layer.grads[key]
        if key in layer.positive:
            np.maximum(layer.params[key], 1e-8, out=layer.params[key])
    return x


@pytest.mark.parametrize("quantizer", [None, "ste", "lsqplus"])
def test_state_dict_round_trip_is_exact(quantizer, rng):
    bits = 32 if quantizer is None else 3
    a = nn.small_cnn(quantizer=quantizer, w_bits=bits, a_bits=bits, width=(4, 5, 6), seed=3)
    x = _one_step(a, rng)
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b = nn.small_cnn(**a.config)
    b.load_state_dict(state)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    np.testing.assert_array_equal(a.forward(x, train=False)[0], b.forward(x, train=False)[0])
    state["conv1.W"][...] = 0                                  # a copy, not a view
    assert np.any(a.layers[0].params["W"] != 0)


def test_load_state_dict_refuses_mismatches_without_half_loading(rng):
    model = nn.small_cnn(quantizer="lsq", w_bits=4, a_bits=4, width=(4, 5, 6))
    before = model.state_dict()
    good = {k: v + 1.0 for k, v in before.items()}
    bad_shape = dict(good, **{"fc.W": np.zeros((3, 3), np.float32)})
    missing = {k: v for k, v in good.items() if k != "bn2.running_var"}
    extra = dict(good, **{"conv9.W": np.zeros(3, np.float32)})
    nonfinite = dict(good, **{"conv2.s_a": np.full((1, 1, 1, 1), np.nan, np.float32)})
    for bad, words in [(bad_shape, "fc.W"), (missing, "bn2.running_var"), (extra, "conv9.W"),
                       (nonfinite, "conv2.s_a")]:
        with pytest.raises(MecrefError, match=words.replace(".", r"\.")):
            model.load_state_dict(bad)
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(rng):
    conv = nn.Conv2d(1, 4, 3)
    with pytest.raises(MecrefError, match="4-dimensional"):
        conv.forward(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(MecrefError, match="1 channels"):
        conv.forward(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(MecrefError, match="smaller than"):
        conv.forward(np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(TypeError, match="floating"):
        conv.forward(np.zeros((2, 1, 5, 5), np.int64))
    with pytest.raises(MecrefError, match="forward"):
        nn.Conv2d(1, 4, 3).backward(np.zeros((2, 4, 3, 3), np.float32))
    conv.forward(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(MecrefError, match=r"\(2, 4, 3, 3\)"):
        conv.backward(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(MecrefError, match="quantizer.*'lsq2'"):
        nn.small_cnn(quantizer="lsq2", w_bits=4, a_bits=4)
    with pytest.raises(MecrefError, match="scheme"):
        nn.QuantConv2d(1, 2, scheme="pact")
    for bad in (0, 9, 16, 4.0, True, None):
        with pytest.raises(MecrefError, match="w_bits.*1..8.*32"):
            nn.small_cnn(quantizer="lsq", w_bits=bad, a_bits=4)
    with pytest.raises(MecrefError, match="first_last_bits"):
        nn.small_cnn(quantizer="lsq", w_bits=4, a_bits=4, first_last_bits=0)
    with pytest.raises(MecrefError, match="quantizer=None"):
        nn.small_cnn(w_bits=4)
    with pytest.raises(MecrefError, match="width"):
        nn.small_cnn(width=(16, 32))
    model = nn.small_cnn(width=(2, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        model.forward(np.zeros((2, 1, 8, 8)))
    with pytest.raises(MecrefError, match="x must be 4-dimensional"):
        model.forward(np.zeros((2, 8, 8), np.float32))
    logits, _ = model.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(MecrefError, match="dfeatures"):
        model.backward(np.zeros_like(logits), np.zeros((2, 5), np.float32))


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("quantizer,bits", [(None, 32), ("lsq", 4), ("ste", 2), ("dorefa_pact", 2),
                                            ("lsqplus", 3)])
def test_small_cnn_on_backend_matches_numpy(backend, quantizer, bits, rng):
    """The network's forward on the backend; its backward layer by layer, each layer fed the
    NumPy network's own input and a common dy. Through the whole network the backends may
    disagree where a decision sits on a knife edge (a fake-quantized value at a grid point, a
    pooled maximum at exactly 0 after ReLU): their sums run in different orders (as on a GPU),
    and one flipped decision changes every gradient below it."""
    def build(on="numpy"):
        return nn.small_cnn(quantizer=quantizer, w_bits=bits, a_bits=bits, width=(4, 6, 8),
                            seed=2, backend=on)

    ref, dev = build(), build(backend)
    xp = get_xp(backend)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    logits, feats = ref.forward(x)
    d_logits, d_feats = dev.forward(to_backend(x, backend))
    assert isinstance(d_logits, xp.ndarray)
    np.testing.assert_allclose(to_host(d_logits), logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(to_host(d_feats), feats, rtol=1e-3, atol=1e-3)
    ref, dev = build(), build(backend)           # fresh state (quantizer init, EMA, BN stats)
    h = x
    for name, layer, dlayer in zip(ref.names, ref.layers, dev.layers):
        y = layer.forward(h)
        dlayer.forward(to_backend(h, backend))
        g = rng.standard_normal(y.shape).astype(np.float32)
        dx, d_dx = layer.backward(g), dlayer.backward(to_backend(g, backend))
        h = y
        if dx is not None:
            np.testing.assert_allclose(to_host(d_dx), dx, rtol=1e-4, atol=1e-5, err_msg=name)
        for key in layer.grads:
            np.testing.assert_allclose(to_host(dlayer.grads[key]), layer.grads[key], rtol=1e-4,
                                       atol=1e-5, err_msg=f"{name}.{key}")


def test_small_cnn_taps_add_their_gradient_at_the_tapped_outputs(rng):
    """A loss that also reads inner outputs directly (derivations T3): every param gradient
    of CE + sum(R_f * features) + sum(R_1 * pool1) + sum(R_2 * pool2) against float64 central
    differences; the taps are the very arrays the next layers read."""
    model = nn.small_cnn(width=(2, 3, 4), num_classes=3, seed=5).astype(np.float64)
    x = rng.standard_normal((2, 1, 8, 8))
    y = np.array([0, 2])
    logits, feats, taps = model.forward(x, train=True, taps=("pool1", "pool2"))
    R = {k: rng.standard_normal(v.shape) for k, v in taps.items()}
    Rf = rng.standard_normal(feats.shape)

    def loss():
        lg, f, t = model.forward(x, train=True, taps=("pool1", "pool2"))
        return (float(softmax_cross_entropy(lg, y)[0]) + float(np.sum(Rf * f))
                + sum(float(np.sum(R[k] * t[k])) for k in R))

    assert taps["pool1"].shape == (2, 2, 4, 4) and taps["pool2"].shape == (2, 3, 2, 2)
    logits, feats, taps = model.forward(x, train=True, taps=("pool1", "pool2"))
    _, cache = softmax_cross_entropy(logits, y)
    model.backward(softmax_cross_entropy_backward(cache), Rf, dtaps=R)
    grads = {name: layer.grads[key].copy() for name, layer, key in model.named_params()}
    for name, layer, key in model.named_params():
        np.testing.assert_allclose(grads[name], num_grad(loss, layer.params[key]),
                                   rtol=1e-5, atol=1e-8, err_msg=name)
    # without the taps' gradients the conv1 gradient is a different one
    model.forward(x, train=True)
    model.backward(softmax_cross_entropy_backward(cache), Rf)
    assert not np.allclose(model.layers[0].grads["W"], grads["conv1.W"])
    with pytest.raises(MecrefError, match="taps must name"):
        model.forward(x, taps=("fc",))
    with pytest.raises(MecrefError, match="dtaps\\['pool1'\\] must have the shape"):
        model.forward(x, train=True, taps=("pool1",))
        model.backward(softmax_cross_entropy_backward(cache), None, dtaps={"pool1": R["pool2"]})
