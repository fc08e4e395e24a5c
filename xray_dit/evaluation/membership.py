"""Membership inference: can an attacker tell whether a patient's image was in the generator's training set?

Two attacks, one statistic:
  * black box, `distance_attack`: a training image lies closer to the released synthetic set than a new
    patient's image does (run it on every set that might be released: all generated, or accepted);
  * white box, `denoising_losses`: the DiT predicts the noise added to its own training latents better than
    that added to new latents (lower ε-prediction loss = member);
  * `mia_auc_with_ci`: the attack's AUC (0.5 = no leakage, 1 = every member identified) with a
    patient-level bootstrap interval and a patient-level permutation p-value against "no leakage".
Members are target-class training images; non-members are held-out images of the same class and patients
outside training (validation, or test where the integrator allows it); a patient is never on both sides.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from sklearn.metrics import roc_auc_score

from xray_dit.diffusion import losses, samplers
from xray_dit.diffusion.schedules import Schedule
from xray_dit.evaluation import classification, privacy


class MembershipInference(NamedTuple):
    auc: float                # P(a member scores as more member-like than a non-member); ties count 1/2
    lower: float              # patient-level bootstrap (1 - alpha) interval
    upper: float
    p_value: float            # one-sided, patient-level permutation test of AUC > 0.5
    members: int
    nonmembers: int
    member_patients: int
    nonmember_patients: int


def _scores(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or not x.size or not np.isfinite(x).all():
        raise ValueError(f"{name} must be a non-empty 1-D array of finite scores, got shape {x.shape}")
    return x


def patient_permutation_p_value(member_likeness, is_member, patients, n_permutations: int = 1000,
                                seed: int = 0) -> float:
    """P(AUC >= observed) when member/non-member labels are shuffled between patients (whole patients keep
    their images together), as (1 + #{permuted >= observed}) / (1 + n_permutations)."""
    ranks = scipy.stats.rankdata(member_likeness)          # midranks: ties count 1/2 in the AUC
    is_member = np.asarray(is_member, bool)
    _, image_patient = np.unique(patients, return_inverse=True)
    patient_is_member = np.zeros(image_patient.max() + 1, bool)
    patient_is_member[image_patient[is_member]] = True

    def auc(member_masks: np.ndarray) -> np.ndarray:      # Mann-Whitney U / (m n), one row per mask
        m = member_masks.sum(axis=-1)
        n = member_masks.shape[-1] - m
        return (member_masks @ ranks - m * (m + 1) / 2) / (m * n)

    observed = auc(is_member[None].astype(np.float64))[0]
    rng = np.random.default_rng(seed)
    exceed, done = 0, 0
    while done < n_permutations:
        b = min(1000, n_permutations - done)
        shuffled = np.stack([rng.permutation(patient_is_member) for _ in range(b)])
        exceed += int(np.sum(auc(shuffled[:, image_patient].astype(np.float64)) >= observed - 1e-12))
        done += b
    return (1 + exceed) / (1 + n_permutations)


def mia_auc_with_ci(member_scores, nonmember_scores, member_patients, nonmember_patients, *, n_boot: int = 1000,
                    n_permutations: int = 1000, seed: int = 0, alpha: float = 0.05,
                    lower_is_member: bool = True) -> MembershipInference:
    """AUC of a membership attack with a patient-level bootstrap CI and permutation p-value.

    Scores are one per image: distances to the nearest synthetic image or denoising losses, where lower
    means "member" (`lower_is_member=True`), or any score where higher does. Patients resampled or
    relabelled together, because images of one patient are not independent.
    """
    members, nonmembers = _scores(member_scores, "member_scores"), _scores(nonmember_scores, "nonmember_scores")
    member_patients = np.asarray(member_patients).astype(str)        # ids compared as text, as stored
    nonmember_patients = np.asarray(nonmember_patients).astype(str)
    if member_patients.shape != members.shape or nonmember_patients.shape != nonmembers.shape:
        raise ValueError("need one patient id per member and per non-member score")
    if set(member_patients.tolist()) & set(nonmember_patients.tolist()):
        raise ValueError("a patient is both member and non-member; non-members must be patients outside training")
    is_member = np.concatenate([np.ones(members.size, int), np.zeros(nonmembers.size, int)])
    likeness = np.concatenate([members, nonmembers]) * (-1.0 if lower_is_member else 1.0)
    patients = np.concatenate([member_patients, nonmember_patients])
    ci = classification.bootstrap_auc_ci(is_member, likeness, patients, n_boot=n_boot, seed=seed, alpha=alpha)
    p_value = patient_permutation_p_value(likeness, is_member, patients, n_permutations, seed)
    return MembershipInference(float(roc_auc_score(is_member, likeness)), ci.lower, ci.upper, float(p_value),
                               int(members.size), int(nonmembers.size), len(np.unique(member_patients)),
                               len(np.unique(nonmember_patients)))


def distance_attack(member_images, nonmember_images, synthetic_images, member_patients, nonmember_patients, *,
                    nearest_fn: Callable = privacy.pixel_nearest_neighbours, **kwargs) -> MembershipInference:
    """Black-box attack: each real image's distance to its nearest synthetic image, lower = member.

    `nearest_fn(query, reference)` returns distances first (pixel, shift-tolerant or feature space);
    `kwargs` go to `mia_auc_with_ci`.
    """
    member_d = nearest_fn(member_images, synthetic_images)[0]
    nonmember_d = nearest_fn(nonmember_images, synthetic_images)[0]
    return mia_auc_with_ci(member_d, nonmember_d, member_patients, nonmember_patients, lower_is_member=True, **kwargs)


def denoising_losses(apply_fn: Callable, params, latents, labels, schedule: Schedule, timesteps, n_noise: int,
                     rng: jax.Array, batch_size: int = 64) -> np.ndarray:
    """Per-image ε-prediction MSE, averaged over the schedule indices `timesteps` and `n_noise` noise draws.

    `apply_fn(params, x_t, t, y)` is the DiT's forward (e.g. `lambda p, x, t, y: model.apply({"params": p},
    x, t, y)`), given original timesteps `schedule.timestep_map[t]` as in training; a learned-variance
    output is split and only ε is scored. `latents` (N, H, W, C) are exactly what the DiT trained on (VAE
    posterior means times the scaling factor); `labels` (N,) or None for an unconditional DiT. Image i's
    noise comes from `fold_in(rng, i)`, so results do not depend on `batch_size`, and image i of every set
    scored with one `rng` gets the same noise (common random numbers for members and non-members). Calls
    with the same `apply_fn` and `schedule` objects reuse one compiled program. Lower loss = member.
    """
    latents = np.asarray(latents, np.float32)
    steps = np.asarray(timesteps, np.int32).ravel()
    if latents.ndim != 4 or not len(latents) or n_noise < 1 or not steps.size:
        raise ValueError(f"need (N, H, W, C) latents, n_noise >= 1 and timesteps; got {latents.shape}, {n_noise}, "
                         f"{steps.size} timesteps")
    if steps.min() < 0 or steps.max() >= schedule.num_steps:
        raise ValueError(f"timesteps must be schedule indices in [0, {schedule.num_steps}), got {steps.tolist()}")
    conditional = labels is not None
    labels = np.zeros(len(latents), np.int32) if labels is None else np.asarray(labels, np.int32)
    grid_t = jnp.asarray(np.repeat(steps, n_noise))                     # every (timestep, draw) pair
    static = dict(apply_fn=apply_fn, schedule=_ByIdentity(schedule), conditional=conditional)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(len(latents)))
    batch_size = min(batch_size, len(latents))
    result = []
    for start in range(0, len(latents), batch_size):
        # A short last batch repeats its last image, so every batch has the one compiled shape.
        rows = np.minimum(np.arange(start, start + batch_size), len(latents) - 1)
        losses_of_batch = _batch_denoising_losses(params, jnp.asarray(latents[rows]), jnp.asarray(labels[rows]),
                                                  keys[rows], grid_t, **static)
        result.append(np.asarray(losses_of_batch)[:len(latents) - start])
    return np.concatenate(result)


class _ByIdentity:
    """A static jit argument equal only to itself: the compiled program stays tied to this very object
    (a schedule of numpy tables has no hash of its own)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value


@functools.partial(jax.jit, static_argnames=("apply_fn", "schedule", "conditional"))
def _batch_denoising_losses(params, x0, y, keys, grid_t, *, apply_fn, schedule, conditional):
    """Mean ε MSE of each image over the (timestep, draw) pairs `grid_t`, as one scan."""
    schedule = schedule.value
    timestep_map = jnp.asarray(schedule.timestep_map, jnp.int32)

    def one_pair(total, pair):
        index, t_index = pair
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), x0.shape[1:]))(keys)
        t = jnp.full((x0.shape[0],), t_index)
        x_t = losses.q_sample(schedule, x0, t, noise)
        out = apply_fn(params, x_t, timestep_map[t], y if conditional else None).astype(jnp.float32)
        eps, _ = samplers.split_model_output(out, x0.shape[-1])
        return total + losses.epsilon_mse_loss(eps, noise), None

    total, _ = jax.lax.scan(one_pair, jnp.zeros(x0.shape[0]), (jnp.arange(grid_t.size), grid_t))
    return total / grid_t.size
