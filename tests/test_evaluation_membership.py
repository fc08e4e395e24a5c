"""Evaluation room, membership inference: AUC with patient-level uncertainty, distance and loss attacks."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xray_dit.diffusion import losses, schedules
from xray_dit.evaluation import membership
from xray_dit.models import dit


def brute_force_auc(members_likeness, nonmembers_likeness):
    wins = [1.0 if m > n else 0.5 if m == n else 0.0 for m in members_likeness for n in nonmembers_likeness]
    return float(np.mean(wins))


# ---- AUC, bootstrap, permutation ---------------------------------------------------------------------------
def test_mia_auc_counts_member_wins_with_ties_and_reads_the_score_direction():
    member, nonmember = np.array([0.1, 0.2, 0.2, 0.5, 0.3]), np.array([0.2, 0.6, 0.4, 0.9])
    result = membership.mia_auc_with_ci(member, nonmember, ["a", "a", "b", "c", "d"], ["e", "f", "g", "g"],
                                        n_boot=200, n_permutations=200)
    assert result.auc == pytest.approx(brute_force_auc(-member, -nonmember))
    assert result.lower <= result.auc <= result.upper
    assert (result.members, result.nonmembers, result.member_patients, result.nonmember_patients) == (5, 4, 4, 3)
    flipped = membership.mia_auc_with_ci(member, nonmember, ["a", "a", "b", "c", "d"], ["e", "f", "g", "g"],
                                         n_boot=200, n_permutations=200, lower_is_member=False)
    assert flipped.auc == pytest.approx(1 - result.auc)
    with pytest.raises(ValueError, match="both member and non-member"):
        membership.mia_auc_with_ci(member, nonmember, ["a", "a", "b", "c", "d"], ["e", "f", "a", "g"])


def test_permutation_p_value_matches_exact_enumeration_over_patients():
    scores = np.array([0.9, 0.8, 0.85, 0.4, 0.7, 0.3, 0.5, 0.2, 0.6])
    patients = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
    member_patients = {0, 1, 2}
    is_member = np.isin(patients, list(member_patients))

    def auc(member_set):
        mask = np.isin(patients, list(member_set))
        return brute_force_auc(scores[mask], scores[~mask])

    observed = auc(member_patients)
    exact = np.mean([auc(set(c)) >= observed - 1e-12 for c in itertools.combinations(range(6), 3)])
    p = membership.patient_permutation_p_value(scores, is_member, patients, n_permutations=20_000, seed=1)
    assert exact == pytest.approx(3 / 20)   # AUCs 0.85, 0.85 and 0.9 of the 20 assignments reach 0.85
    assert p == pytest.approx(exact, abs=0.01)


def test_patient_level_interval_is_wider_when_a_patient_contributes_many_alike_images():
    rng = np.random.default_rng(0)
    member_patient_scores, nonmember_patient_scores = rng.normal(-0.3, 1, 12), rng.normal(0.3, 1, 12)
    member, nonmember = np.repeat(member_patient_scores, 6), np.repeat(nonmember_patient_scores, 6)
    by_patient = membership.mia_auc_with_ci(member, nonmember, np.repeat(np.arange(12), 6),
                                            np.repeat(np.arange(12, 24), 6), n_boot=500, n_permutations=500)
    by_image = membership.mia_auc_with_ci(member, nonmember, np.arange(72), np.arange(72, 144), n_boot=500,
                                          n_permutations=500)
    assert by_patient.auc == by_image.auc
    assert by_patient.upper - by_patient.lower > 1.8 * (by_image.upper - by_image.lower)
    assert by_patient.p_value > 5 * by_image.p_value   # 12 + 12 patients, not 144 independent images


def test_distance_attack_finds_copied_members_and_not_independent_samples():
    rng = np.random.default_rng(3)
    members, nonmembers = rng.random((40, 8, 8)), rng.random((40, 8, 8))
    member_ids, nonmember_ids = np.arange(40) // 2, 100 + np.arange(40) // 2
    leaked = membership.distance_attack(members, nonmembers, members[:30] + 0.01 * rng.random((30, 8, 8)),
                                        member_ids, nonmember_ids, n_boot=300, n_permutations=300)
    # 30 of 40 members copied: expected AUC 0.75 · 1 + 0.25 · 1/2.
    assert leaked.auc > 0.8 and leaked.lower > 0.5 and leaked.p_value < 0.01
    safe = membership.distance_attack(members, nonmembers, rng.random((30, 8, 8)), member_ids, nonmember_ids,
                                      n_boot=300, n_permutations=300)
    assert safe.lower < 0.5 < safe.upper and safe.p_value > 0.05


# ---- white box: denoising losses ---------------------------------------------------------------------------
def oracle_denoiser(full_schedule):
    """ε̂ = (x_t − √ᾱ_t·x_y) / √(1 − ᾱ_t) for the stored latent x_y (params), t the original timestep; plus
    C channels of variance values, which must be ignored."""
    abar = jnp.asarray(full_schedule.alphas_cumprod, jnp.float32)

    def apply(table, x, t, y):
        a = abar[t][:, None, None, None]
        eps = (x - jnp.sqrt(a) * table[y]) / jnp.sqrt(1 - a)
        return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], axis=-1)
    return apply


def test_denoising_losses_equal_the_closed_form_of_an_oracle_on_a_respaced_schedule():
    full = schedules.make_schedule("linear", 1000)
    spaced = schedules.respace(full, 50)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5, 4, 4, 2)).astype(np.float32)
    latents, labels = table[[0, 1, 2, 3, 4, 0, 2]], np.array([0, 1, 3, 3, 0, 4, 2])
    steps = [2, 20, 45]
    got = membership.denoising_losses(oracle_denoiser(full), jnp.asarray(table), latents, labels, spaced, steps,
                                      n_noise=3, rng=jax.random.key(0), batch_size=3)
    # x_t = √ᾱ x_i + √(1-ᾱ) ε  ⇒  ε − ε̂ = √ᾱ (x_y − x_i) / √(1 − ᾱ): the noise cancels.
    abar = full.alphas_cumprod[spaced.timestep_map[steps]]
    gap = np.mean((table[labels] - latents) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(got, gap * np.mean(abar / (1 - abar)), rtol=1e-4, atol=1e-6)
    assert got[[0, 1, 3, 6]].max() < 1e-6   # its own latent: perfect prediction
    whole = membership.denoising_losses(oracle_denoiser(full), jnp.asarray(table), latents, labels, spaced, steps,
                                        n_noise=3, rng=jax.random.key(0), batch_size=64)
    np.testing.assert_allclose(whole, got, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="schedule indices"):
        membership.denoising_losses(oracle_denoiser(full), table, latents, labels, spaced, [50], 1, jax.random.key(0))


def test_denoising_losses_of_a_silent_model_are_the_noise_energy_shared_across_sets():
    schedule = schedules.make_schedule("linear", 100)

    def silent(params, x, t, y):
        return jnp.zeros_like(x)

    a, b = np.random.default_rng(1).standard_normal((2, 32, 4, 4, 4))
    loss_a = membership.denoising_losses(silent, {}, a, None, schedule, [10, 50], 4, jax.random.key(3), batch_size=5)
    loss_b = membership.denoising_losses(silent, {}, b, None, schedule, [10, 50], 4, jax.random.key(3), batch_size=5)
    # 32 images x 8 draws x 64 standard normal values: mean ε² = 1 ± sqrt(2/16384) ≈ 0.011.
    assert loss_a.mean() == pytest.approx(1.0, abs=0.045)
    assert 0.6 < loss_a.min() and loss_a.max() < 1.4   # each: 512 values, sd ≈ 0.0625
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)  # image i of any set gets the same noise


TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                class_dropout_prob=0.0, num_classes=1, learn_sigma=True)


def overfit(model, params, members, schedule, steps: int, lr: float):
    """Plain ε-MSE training on the members alone (full batch, uniform t) until they are memorised."""
    labels = jnp.zeros(len(members), jnp.int32)
    optimizer = optax.adam(lr)

    def loss_fn(p, key):
        t_key, noise_key = jax.random.split(key)
        t = jax.random.randint(t_key, (len(members),), 0, schedule.num_steps)
        noise = jax.random.normal(noise_key, members.shape)
        out = model.apply({"params": p}, losses.q_sample(schedule, members, t, noise), t, labels)
        return jnp.mean(losses.epsilon_mse_loss(out[..., :members.shape[-1]], noise))

    @jax.jit
    def step(p, state, key):
        grads = jax.grad(loss_fn)(p, key)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for key in jax.random.split(jax.random.key(2), steps):
        params, state = step(params, state, key)
    return params


@pytest.mark.slow
def test_loss_attack_separates_members_of_an_overfit_dit_but_not_of_an_untrained_one():
    model = dit.DiT(**TINY_DIT)
    schedule = schedules.make_schedule("linear", 1000)
    latents = np.random.default_rng(0).standard_normal((32, 8, 8, 4)).astype(np.float32)
    members, ids = latents[:16], np.arange(32)
    # Random N(0, 0.05²) weights, not adaLN-zero (whose output is 0 whatever the input), drawn with numpy
    # since eager JAX would compile one program per parameter shape. Training starts from them too.
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                                             jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))))
    draw = np.random.default_rng(5)
    untrained = jax.tree.map(lambda x: (0.05 * draw.standard_normal(x.shape)).astype(np.float32), shapes["params"])
    trained = overfit(model, untrained, jnp.asarray(members), schedule, steps=200, lr=1e-2)

    def apply(p, x, t, y):
        return model.apply({"params": p}, x, t, y)

    def attack(params):   # one apply function for both models: one compiled program
        scores = membership.denoising_losses(apply, params, latents, np.zeros(32, np.int32), schedule,
                                             [100, 200, 300, 400], n_noise=2, rng=jax.random.key(1))
        return membership.mia_auc_with_ci(scores[:16], scores[16:], ids[:16], ids[16:], n_boot=200,
                                          n_permutations=500)

    leaked = attack(trained)
    assert leaked.auc >= 0.8 and leaked.p_value < 0.01
    # Under no leakage the AUC of 16 vs 16 has sd sqrt((m + n + 1) / (12 m n)) ≈ 0.10: allow 3 sd.
    assert abs(attack(untrained).auc - 0.5) <= 0.3
