"""Susceptibilities (slt_jax.susceptibilities) against the closed forms of linear regression.

χ(φ, q) = d/dh E_h[φ] = −nβ·Cov(φ, L_q − L_n) (docs/mathematics.md §8.2). For the loss
½(y − xᵀw)² every loss is quadratic, and under a Gaussian law N(μ, S)
Cov(f, g) = ∇f(μ)ᵀS∇g(μ) + ½·tr(∇²f S ∇²g S): exact for the posterior, and for SGLD's
stationary law up to its tiny non-Gaussianity (§8.4). The sampled χ is compared with that
formula at SGLD's own S (Lyapunov with the minibatch term, per component: the restricted
coordinates only), and the formula itself with a finite difference of the closed-form
posterior mean in h (the exponential-family identity, exact).

Tolerance: 4 standard errors of the delete-one-chain jackknife over 32 chains per component
(Student t, 31 degrees of freedom: P(|t| > 4) = 3.6e-4); over the 12 values per seed the
expected number of exceedances under the null is 0.004, and none is allowed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slt_jax
from slt_jax.groundtruth import linear_regression_posterior
from slt_jax.models import Transformer, TransformerConfig, from_nnx, per_token_loss

N, D, SHIFT_ROWS, BATCH = 64, 3, 16, 16
NBETA, GAMMA, EPS = N / np.log(N), 1.0, 0.01
RUN = dict(step_size=EPS, localization=GAMMA, num_chains=32, num_burnin=500, num_draws=1000, batch_size=BATCH,
           chunk_size=512, progress=False)
DIRECTION = np.array([0.3, 1.0, -0.5])
MASKS = {"model": np.ones(D, bool), "w0": np.array([True, False, False]), "w12": np.array([False, True, True])}


def squared_error(w, batch):
    return 0.5 * jnp.mean(jnp.square(batch["y"] - batch["x"] @ w))


def linear_observable(w):
    return jnp.dot(jnp.asarray(DIRECTION, w.dtype), w)


def problem(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.standard_normal(N)
    xq = rng.standard_normal((SHIFT_ROWS, D)) * np.array([2.0, 0.5, 1.0])  # data toward another teacher
    yq = xq @ np.array([1.5, -2.0, 0.0]) + rng.standard_normal(SHIFT_ROWS)
    return {"x": x, "y": y}, {"x": xq, "y": yq}, np.linalg.lstsq(x, y, rcond=None)[0]


def moments(data, shift):
    """Hessians and linear terms of L_n and L_q: L(w) = ½wᵀHw − bᵀw + const."""
    return (data["x"].T @ data["x"] / N, data["x"].T @ data["y"] / N,
            shift["x"].T @ shift["x"] / SHIFT_ROWS, shift["x"].T @ shift["y"] / SHIFT_ROWS)


def closed_form(data, shift, w_star, mean, cov):
    """(χ of the linear observable, χ of φ = L_n, λ̂ = nβ·E[L_n − L_n(w*)]) under N(mean, cov)."""
    h, b, hq, bq = moments(data, shift)
    grad_n, grad_delta = h @ mean - b, (hq @ mean - bq) - (h @ mean - b)
    linear = -NBETA * DIRECTION @ cov @ grad_delta
    loss = -NBETA * (grad_n @ cov @ grad_delta + 0.5 * np.trace(h @ cov @ (hq - h) @ cov))
    shift_of_mean = 0.5 * (mean - w_star) @ h @ (mean - w_star) + (h @ w_star - b) @ (mean - w_star)
    return linear, loss, NBETA * (shift_of_mean + 0.5 * np.trace(h @ cov))


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def sampled(request):
    seed = request.param
    data, shift, w_star = problem(seed)
    common = dict(shifts={"q": shift}, components={k: jnp.asarray(v) for k, v in MASKS.items()}, **RUN)
    w = jnp.asarray(w_star, jnp.float32)
    # Two estimators of the L_n inside ΔL: a minibatch per draw (with the linear observable),
    # and the exact full-batch loss (with the component observable φ_C).
    linear = slt_jax.susceptibilities(squared_error, w, data, jax.random.key(seed), observable=linear_observable,
                                      **common)
    loss = slt_jax.susceptibilities(squared_error, w, data, jax.random.key(seed), loss_estimator="full_batch",
                                    **common)
    truths = []
    for mask in MASKS.values():
        law = linear_regression_posterior(data["x"], data["y"], center=w_star, nbeta=NBETA, localization=GAMMA,
                                          step_size=EPS, batch_size=BATCH, mask=mask)
        truths.append(closed_form(data, shift, w_star, *law))
    return linear, loss, np.array(truths)


def test_susceptibilities_match_the_closed_form_per_component(sampled):
    linear, loss, truth = sampled
    z_linear = (linear.chi[:, 0] - truth[:, 0]) / linear.se[:, 0]
    z_loss = (loss.chi[:, 0] - truth[:, 1]) / loss.se[:, 0]
    print(f"linear φ: χ = {linear.chi[:, 0]}, truth {truth[:, 0]}, z {z_linear}")
    print(f"φ_C = L_n: χ = {loss.chi[:, 0]}, truth {truth[:, 1]}, z {z_loss}")
    assert np.all(np.abs(z_linear) < 4) and np.all(np.abs(z_loss) < 4)
    assert linear.components == ("model", "w0", "w12") and linear.shifts == ("q",)


def test_each_component_group_reads_its_refined_llc(sampled):
    # λ̂_C = nβ·E_C[L_n − L_n(w*)] from the same chains: the per-chain masks restrict each group.
    for result in sampled[:2]:
        z = (result.llc_mean - sampled[2][:, 2]) / result.llc_se
        assert np.all(np.abs(z) < 4), z


def test_contributions_average_to_chi_and_the_response_matrix_has_principal_components(sampled):
    linear, loss, _ = sampled
    for result in (linear, loss):
        assert result.contributions["q"].shape == (3, SHIFT_ROWS)
        np.testing.assert_allclose(result.contributions["q"].mean(axis=1), result.chi[:, 0], rtol=1e-6)
        assert result.pca.scores.shape == (3, 1) and result.pca.loadings.shape == (1, 1)
    assert linear.settings["components"] == {"model": "pytree", "w0": "pytree", "w12": "pytree"}


@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 1])
def test_chi_is_the_derivative_of_the_posterior_mean_in_h(seed):
    # The exponential-family identity on the closed-form posterior p_h ∝ exp(−nβ[(1−h)L_n + hL_q]
    # − γ/2‖w − w*‖²) = N(μ_h, P_h⁻¹): a central difference of E_h[φ] against −nβ·Cov(φ, L_q − L_n).
    data, shift, w_star = problem(seed)
    h, b, hq, bq = moments(data, shift)

    def law(t):
        precision = NBETA * ((1 - t) * h + t * hq) + GAMMA * np.eye(D)
        mean = np.linalg.solve(precision, NBETA * ((1 - t) * b + t * bq) + GAMMA * w_star)
        return mean, np.linalg.inv(precision)

    def expectations(t):
        mean, cov = law(t)
        loss = 0.5 * mean @ h @ mean - b @ mean + 0.5 * np.trace(h @ cov)
        return np.array([DIRECTION @ mean, loss])

    step = 1e-5
    derivative = (expectations(step) - expectations(-step)) / (2 * step)
    linear, loss, _ = closed_form(data, shift, w_star, *law(0.0))
    np.testing.assert_allclose(derivative, [linear, loss], rtol=1e-6)


def tiny_language_model():
    config = TransformerConfig(vocab_size=6, context_length=8, d_model=8, num_heads=2, num_layers=1,
                               attention_only=True, layer_norm=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    loss_fn, params = from_nnx(model, loss="next_token")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, (64, 8)).astype(np.int32)
    segment = rng.integers(0, 6, (8, 4)).astype(np.int32)
    return model, loss_fn, params, {"tokens": tokens}, {"tokens": np.concatenate([segment, segment], axis=1)}


def bigram_losses(params, batch):
    """Per-token next-token cross-entropy of a bigram model (logits = table[previous token])."""
    tokens = batch["tokens"]
    logits = params["table"][tokens[:, :-1]]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]


def test_per_token_probe_sets_give_per_token_contributions():
    # A bigram model (a transformer's per-token interface at a fraction of its compile time; the
    # transformer itself runs below, marked slow): probes of shape (rows, T) give (rows, T − 1).
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, (64, 6)).astype(np.int32)
    segment = rng.integers(0, 5, (8, 3)).astype(np.int32)
    probe = {"tokens": np.concatenate([segment, segment], axis=1)}
    loss_fn = lambda p, b: jnp.mean(bigram_losses(p, b))
    params = {"table": jnp.asarray(0.1 * rng.standard_normal((5, 5)), jnp.float32)}
    result = slt_jax.susceptibilities(loss_fn, params, {"tokens": tokens}, jax.random.key(0), shifts={"repeat": probe},
                                      components={"model": None, "row 0": {"table": np.eye(5, dtype=bool)[:1].T}},
                                      per_sample_loss=bigram_losses, step_size=1e-3, localization=10.0, num_chains=4,
                                      num_burnin=50, num_draws=50, batch_size=16, progress=False)
    assert result.contributions["repeat"].shape == (2, 8, 5)
    np.testing.assert_allclose(result.contributions["repeat"].mean(axis=(1, 2)), result.chi[:, 0], rtol=1e-6)
    assert result.settings["num_sampled_per_component"] == {"model": 25, "row 0": 5}


@pytest.mark.slow
def test_per_token_probe_sets_for_a_transformer_give_per_token_contributions():
    # A "repeated segment" probe: each contribution is one target token's attribution score, and
    # χ is their mean because the mean of the per-token losses is the probe's next-token loss.
    model, loss_fn, params, data, probe = tiny_language_model()
    per_token = per_token_loss(model)
    np.testing.assert_allclose(jnp.mean(per_token(params, probe)), loss_fn(params, probe), rtol=1e-6)
    result = slt_jax.susceptibilities(loss_fn, params, data, jax.random.key(0), shifts={"repeat": probe},
                                      components={"model": None, "head 0": slt_jax.head(0, 0),
                                                  "head 1": slt_jax.head(0, 1)},
                                      per_sample_loss=per_token, step_size=1e-4, localization=100.0, num_chains=4,
                                      num_burnin=50, num_draws=50, batch_size=16, progress=False)
    assert result.contributions["repeat"].shape == (3, 8, 7)
    assert np.all(np.isfinite(result.contributions["repeat"])) and np.all(np.isfinite(result.chi))
    np.testing.assert_allclose(result.contributions["repeat"].mean(axis=(1, 2)), result.chi[:, 0], rtol=1e-6)
    assert result.settings["num_sampled_per_component"]["head 0"] < result.settings["num_sampled_per_component"]["model"]


@pytest.mark.parametrize("change, match", [
    (dict(components={"none": np.zeros(D, bool)}), r"components\['none'\] covers no parameter"),
    (dict(components={"typo": "layer_9/.*"}), r"components\['typo'\]: "),
    (dict(shifts={"q": {"x": np.zeros((4, D))}}), r"shifts\['q'\] has the structure"),
    (dict(shifts={"q": {"x": np.zeros((4, D + 1)), "y": np.zeros(4)}}), r"shifts\['q'\]\['x'\] has rows of shape"),
    (dict(shifts={}), r"shifts must be a non-empty dict"),
    (dict(observable=lambda w: jnp.outer(w, w)), r"observable must return a scalar function of the parameters"),
    (dict(observable=lambda w: w), r"observable must return a scalar function .* got \(3,\)"),
])
def test_bad_inputs_name_the_argument_before_sampling(change, match):
    data, shift, w = problem(0)
    kwargs = dict(shifts={"q": shift}, **RUN) | change
    with pytest.raises(ValueError, match=match):
        slt_jax.susceptibilities(squared_error, jnp.asarray(w, jnp.float32), data, jax.random.key(0), **kwargs)


def test_observe_refuses_an_observable_that_is_not_a_scalar_or_vector():
    data, _, w = problem(0)
    with pytest.raises(ValueError, match=r"observables\['m'\] must return a scalar or a vector .* got \(3, 3\)"):
        slt_jax.observe(squared_error, jnp.asarray(w, jnp.float32), data, jax.random.key(0),
                        observables={"m": lambda w: jnp.outer(w, w)}, **RUN)
