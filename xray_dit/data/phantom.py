"""Procedural frontal chest radiographs with a known cardiothoracic ratio, and an oracle that reads it back.

The embedded default dataset of the project: deterministic from a seed, needs no files. A *cohort* is a
list of `PhantomImage` records (metadata only, cheap); `render` draws one at any size. Patients have
stable anatomy (thorax, heart, ribs, body habitus, nodule) and 1..`max_images_per_patient` images that
differ in pose, exposure, noise, view and effusion, so splitting must be patient-wise.

Geometry lives in *anatomy units*: the image spans [-1, 1] in x (left to right as displayed) and y (top to
bottom) at the canonical pose. As in every radiograph, the patient's right is the image's left. Truth:

    CTR = (max horizontal extent of the heart silhouette) / (max inner thoracic width)

where the inner thoracic width is the distance between the outer (lateral) lung borders. The phantom is
built so both are visible: the lateral lung borders run vertically over a stretch of rows (the widest rows
of the thorax, above the costophrenic angles) and the heart's lateral extremes always sit in lung, above
the diaphragm. Cardiomegaly ⇔ CTR > 0.5.

`measure_ctr` reads CTR from pixels only (it never sees the metadata), so it also scores images made by a
generative model trained on the phantom.

Everything is numpy; rendering evaluates the anatomy on a 2x supersampled grid of the target size.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LABELS: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Nodule", "No Finding")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
VIEWS: tuple[str, ...] = ("PA", "AP")

_CTR_RANGE = (0.35, 0.70)  # anatomy stays drawable (heart inside the thorax, clear of the mediastinum)
_SUPERSAMPLE = 2
_SCALE_SD = 0.08  # patient size / distance to the detector, at pose_jitter 1
_HEART_CLEARANCE = 0.08  # the heart's lateral extremes sit at least this far above the diaphragm
# ... and at least this far from the chest wall; pleural fluid stays 0.17 lateral to them.
_LUNG_BESIDE_HEART = 0.2
_NUM_POSTERIOR_RIBS = 10
_NUM_ANTERIOR_RIBS = 6


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """The knobs of a phantom cohort. Defaults give a hard-but-learnable Cardiomegaly task at 64 px.

    cardiomegaly_prevalence, effusion_prevalence, nodule_prevalence: true prevalence of each finding
        (Cardiomegaly and Nodule per patient, Effusion per image). NIH ChestX-ray14 has roughly 2.5 %,
        12 % and 6 %; Cardiomegaly defaults to 5 % so a small cohort still holds some.
    ctr_normal_mean, ctr_enlarged_mean, ctr_std: a patient's CTR is drawn from N(normal_mean, std)
        truncated to (0.35, 0.5), or (with the Cardiomegaly prevalence) from N(enlarged_mean, std)
        truncated to (0.5, 0.7). Means nearer 0.5 put more patients near the threshold (harder); the
        defaults put about 28 % of images within 0.03 of it.
    label_noise: chance that a truly positive finding is recorded negative on an image, the way reports
        mined by NLP miss mentions. Negatives are flipped to positive at label_noise * p / (1 - p)
        (p = that finding's prevalence), so the recorded prevalence stays the true one and about this
        fraction of recorded positives is wrong too. `true_labels` keeps the truth.
    noise_std: quantum noise standard deviation on the [0, 1] intensity scale (AP images get 1.4x).
    exposure_jitter: standard deviation of the log of the exposure's gamma and gain (0 = fixed exposure).
    pose_jitter: scales the pose spread: at 1.0 rotation sd 1.5 degrees, shift sd 0.03 image half-widths,
        log-scale sd 0.08 (patient size and distance); 0 gives the canonical pose. At most 2.
    ap_fraction: share of images taken AP (portable: clavicles higher, noisier) instead of PA.
    max_images_per_patient: each patient gets 1..this many images (fewer more likely).
    split_fractions: train / validation / test shares of the *patients*.
    """

    cardiomegaly_prevalence: float = 0.05
    effusion_prevalence: float = 0.12
    nodule_prevalence: float = 0.06
    ctr_normal_mean: float = 0.43
    ctr_enlarged_mean: float = 0.57
    ctr_std: float = 0.035
    label_noise: float = 0.05
    noise_std: float = 0.025
    exposure_jitter: float = 0.12
    pose_jitter: float = 1.0
    ap_fraction: float = 0.4
    max_images_per_patient: int = 4
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)

    def __post_init__(self):
        for name in ("cardiomegaly_prevalence", "effusion_prevalence", "nodule_prevalence", "ap_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PhantomSpec.{name}={value} must be a probability in [0, 1]")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"PhantomSpec.label_noise={self.label_noise} must be in [0, 1)")
        for name in ("ctr_normal_mean", "ctr_enlarged_mean"):
            value = getattr(self, name)
            if not _CTR_RANGE[0] <= value <= _CTR_RANGE[1]:
                raise ValueError(f"PhantomSpec.{name}={value} must lie in {_CTR_RANGE} (drawable hearts)")
        for name in ("ctr_std", "noise_std", "exposure_jitter", "pose_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"PhantomSpec.{name}={getattr(self, name)} must be >= 0")
        if self.ctr_std == 0 and not (self.ctr_normal_mean < 0.5 < self.ctr_enlarged_mean):
            raise ValueError("with ctr_std=0 the normal mean must be below 0.5 and the enlarged mean "
                             "above it")
        if self.pose_jitter > 2.0:
            raise ValueError(f"PhantomSpec.pose_jitter={self.pose_jitter} must be <= 2: larger rotations "
                             f"tilt the borders the CTR is measured on")
        if not isinstance(self.max_images_per_patient, int) or self.max_images_per_patient < 1:
            raise ValueError(f"PhantomSpec.max_images_per_patient={self.max_images_per_patient} must be >= 1")
        fractions = tuple(self.split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"PhantomSpec.split_fractions={self.split_fractions} must be three shares "
                             f"(train, validation, test) >= 0 summing to 1")


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A patient's body, in anatomy units (see the module docstring). Stable across the patient's images."""

    thorax_half_width: float       # lateral lung border distance from the midline (over the widest rows)
    apex_y: float                  # top of the lungs
    widest_y: float                # from here down to the costophrenic angles the lateral borders run
                                   # vertically
    dome_right_y: float            # top of the right hemidiaphragm (image left)
    dome_left_y: float             # top of the left hemidiaphragm (image right)
    dome_peak_fraction: float      # where the dome peaks, as a fraction of thorax_half_width from the midline
    costophrenic_depth: float      # how far the costophrenic angle lies below the dome top
    body_wall: float               # soft tissue beyond the lateral lung borders
    neck_half_width: float
    shoulder_y: float
    mediastinum_half_width: float
    knob_radius: float             # aortic knob (image right of the upper mediastinum)
    knob_y: float
    heart_center_x: float
    heart_center_y: float
    heart_semi_major: float
    heart_semi_minor: float
    heart_tilt_deg: float          # long axis, degrees below the +x axis (apex down, to image right)
    lung_air: float                # how dark the lungs are
    rib_spacing: float
    rib_offset_y: float            # the first posterior rib's height at the spine
    rib_arch: float                # curvature of the posterior rib arcs
    rib_thickness: float
    clavicle_y: float
    spine_half_width: float
    vessel_phase: float
    breast: float                  # soft-tissue shadow over the lung bases (0 = none)
    gastric_bubble: float          # gas in the stomach under the left hemidiaphragm (0 = none)
    nodule_x: float                # nodule centre; nodule_radius 0 = no nodule
    nodule_y: float
    nodule_radius: float


@dataclasses.dataclass(frozen=True)
class PhantomImage:
    """One radiograph of a cohort: metadata and everything `render` needs. Cheap to make."""

    image_id: str
    patient_id: str
    split: str                          # "train" | "validation" | "test"
    labels: tuple[int, ...]             # recorded (possibly noisy) multi-hot over LABELS
    true_labels: tuple[int, ...]        # the truth, multi-hot over LABELS
    ctr: float                          # true cardiothoracic ratio (the patient's)
    sex: str                            # "M" | "F"
    age: int
    view: str                           # "PA" | "AP"
    render_seed: int                    # noise realisation
    anatomy: Anatomy
    rotation_deg: float                 # pose: anatomy rotated by this (clockwise as displayed), scaled
    shift_x: float                      # by `scale`, shifted by (shift_x, shift_y) image half-widths
    shift_y: float
    scale: float
    exposure_gamma: float
    exposure_gain: float
    noise_std: float
    effusion_right: float               # fluid height at the right (image left) lung base; 0 = none
    effusion_left: float                # same, left (image right) lung base


# ----------------------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------------------


def make_cohort(num_images: int, seed: int = 0, spec: PhantomSpec = PhantomSpec()) -> list[PhantomImage]:
    """`num_images` phantom images of new patients, deterministic in (`num_images`, `seed`, `spec`).

    Patients are drawn one after another (each from its own random stream, so a bigger cohort with the
    same seed starts with the same patients) until the images are counted out; the last patient may get
    fewer images. Patients, not images, are split into train / validation / test by `split_fractions`.
    """
    if not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be a positive integer")
    if not isinstance(spec, PhantomSpec):
        raise ValueError(f"spec must be a PhantomSpec, got {type(spec).__name__}")
    patients = []
    remaining = int(num_images)
    while remaining > 0:
        rng = np.random.default_rng([seed, len(patients)])
        count = min(_images_for_patient(rng, spec.max_images_per_patient), remaining)
        patients.append((rng, count))
        remaining -= count
    splits = _assign_splits(len(patients), spec.split_fractions, np.random.default_rng([seed, 1 << 30]))

    images = []
    for index, ((rng, count), split) in enumerate(zip(patients, splits)):
        patient_id = f"{index:08d}"
        sex, age, ctr, anatomy, has_nodule = _draw_patient(rng, spec)
        for follow_up in range(count):
            images.append(_draw_image(rng, spec, patient_id, follow_up, split, sex, age, ctr, anatomy,
                                      has_nodule))
    return images


def _images_for_patient(rng: np.random.Generator, max_images: int) -> int:
    # Fewer images more likely, as in NIH (most patients have one or two studies).
    weights = 0.6 ** np.arange(max_images)
    return int(rng.choice(max_images, p=weights / weights.sum())) + 1


def _assign_splits(num_patients: int, fractions, rng: np.random.Generator) -> list[str]:
    # Exact counts by largest remainder; every split with a share gets a patient when there are enough.
    fractions = np.asarray(fractions, dtype=np.float64)
    raw = fractions * num_patients
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_patients - counts.sum()]:
        counts[i] += 1
    wanted = fractions > 0
    if num_patients >= wanted.sum():
        for i in np.flatnonzero(wanted & (counts == 0)):
            counts[i] += 1
            counts[np.argmax(counts)] -= 1
    order = rng.permutation(num_patients)
    assignment = [""] * num_patients
    start = 0
    for name, count in zip(SPLITS, counts):
        for patient in order[start:start + count]:
            assignment[patient] = name
        start += count
    return assignment


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> float:
    if std == 0:
        return float(np.clip(mean, low, high))
    for _ in range(1000):
        value = rng.normal(mean, std)
        if low < value < high:
            return float(value)
    # The mean lies far outside (low, high): rejection would not end; take the nearest admissible value.
    return float(np.clip(mean, low + 1e-3, high - 1e-3))


def _draw_patient(rng: np.random.Generator, spec: PhantomSpec):
    sex = "M" if rng.random() < 0.56 else "F"
    age = int(np.clip(round(rng.normal(48, 17)), 18, 92))
    enlarged = rng.random() < spec.cardiomegaly_prevalence
    if enlarged:
        ctr = _truncated_normal(rng, spec.ctr_enlarged_mean, spec.ctr_std, 0.5, _CTR_RANGE[1])
    else:
        ctr = _truncated_normal(rng, spec.ctr_normal_mean, spec.ctr_std, _CTR_RANGE[0], 0.5)
    has_nodule = rng.random() < spec.nodule_prevalence

    male = sex == "M"
    t = float(np.clip(rng.normal(0.75 if male else 0.72, 0.04), 0.62, 0.82))
    apex_y = rng.normal(-0.70, 0.03)
    dome_right_y = rng.normal(0.34, 0.03)
    mediastinum = rng.uniform(0.095, 0.125)

    # Heart: a tilted ellipse whose horizontal extent is exactly ctr * (2 t), seated on the diaphragm.
    # Shapes whose lateral extremes the diaphragm would hide are drawn again.
    width = ctr * 2 * t
    for _ in range(1000):
        tilt = math.radians(rng.uniform(20, 35))
        ratio = rng.uniform(0.62, 0.76)
        semi_major = 0.5 * width / math.sqrt(math.cos(tilt) ** 2 + (ratio * math.sin(tilt)) ** 2)
        semi_minor = ratio * semi_major
        right_share = max(rng.uniform(0.30, 0.38), (mediastinum + 0.06) / width,
                          1 - (t - _LUNG_BESIDE_HEART) / width)
        center_x = width * (0.5 - right_share)
        geometry = dict(thorax_half_width=t, dome_right_y=dome_right_y,
                        dome_left_y=dome_right_y + rng.uniform(0.02, 0.07),
                        dome_peak_fraction=rng.uniform(0.35, 0.55),
                        costophrenic_depth=rng.uniform(0.18, 0.26))
        center_y = _seat_heart(geometry, center_x, semi_major, semi_minor, tilt, rng.uniform(0.45, 0.7))
        if center_y is not None:
            break
    else:
        raise RuntimeError("no drawable heart found; the CTR range or thorax sizes are inconsistent")
    widest_y = rng.normal(0.0, 0.04)
    if has_nodule:
        nodule = _place_nodule(rng, t, apex_y, widest_y, center_x, center_y, semi_major, semi_minor, tilt,
                               mediastinum)
    else:
        nodule = (0.0, 0.0, 0.0)
    anatomy = Anatomy(
        thorax_half_width=t,
        apex_y=float(apex_y),
        widest_y=float(widest_y),
        dome_right_y=float(dome_right_y),
        dome_left_y=float(geometry["dome_left_y"]),
        dome_peak_fraction=float(geometry["dome_peak_fraction"]),
        costophrenic_depth=float(geometry["costophrenic_depth"]),
        body_wall=float(rng.uniform(0.09, 0.22)),
        neck_half_width=float(rng.uniform(0.17, 0.23)),
        shoulder_y=float(rng.normal(-0.80, 0.03)),
        mediastinum_half_width=float(mediastinum),
        knob_radius=float(rng.uniform(0.045, 0.065)),
        knob_y=float(apex_y + rng.uniform(0.28, 0.36)),
        heart_center_x=float(center_x),
        heart_center_y=float(center_y),
        heart_semi_major=float(semi_major),
        heart_semi_minor=float(semi_minor),
        heart_tilt_deg=float(math.degrees(tilt)),
        lung_air=float(rng.uniform(0.56, 0.68)),
        rib_spacing=float(rng.uniform(0.125, 0.15)),
        rib_offset_y=float(apex_y + rng.uniform(-0.06, 0.0)),
        rib_arch=float(rng.uniform(0.75, 1.05)),
        rib_thickness=float(rng.uniform(0.045, 0.06)),
        clavicle_y=float(apex_y + rng.uniform(0.04, 0.1)),
        spine_half_width=float(rng.uniform(0.05, 0.065)),
        vessel_phase=float(rng.uniform(0, 2 * math.pi)),
        breast=0.0 if male else float(rng.uniform(0.04, 0.12)),
        gastric_bubble=float(rng.uniform(0.0, 0.25)) if rng.random() < 0.6 else 0.0,
        nodule_x=nodule[0], nodule_y=nodule[1], nodule_radius=nodule[2],
    )
    return sex, age, ctr, anatomy, has_nodule


def _lung_outer_x(y, t, apex_y, widest_y):
    """The lungs' lateral border: rounds off to the apex above `widest_y`, runs vertically below it."""
    above = np.clip((widest_y - y) / (widest_y - apex_y), 0.0, None)
    return t * np.power(np.clip(1 - above ** 2.2, 0, 1), 1 / 2.2)


def _dome_y(x, t, dome_right_y, dome_left_y, dome_peak_fraction, costophrenic_depth):
    """Height of the diaphragm (the lung's lower border) under x: peaked domes meeting the chest wall at
    the costophrenic angles."""
    r = np.abs(x)
    top = np.where(x < 0, np.float32(dome_right_y), np.float32(dome_left_y))
    peak = dome_peak_fraction * t
    lateral = np.maximum(r - peak, 0.0) / (t - peak)
    medial = np.maximum(peak - r, 0.0)
    return top + costophrenic_depth * lateral ** 2 + 0.6 * medial ** 2


def _seat_heart(geometry, center_x, semi_major, semi_minor, tilt, sink, max_rise=0.25):
    """Heart centre height: sunk into the diaphragm, raised until both lateral extremes sit in lung.

    Each lateral extreme must lie `_HEART_CLEARANCE` above the diaphragm below it, so the lung shows it,
    while the heart's bottom stays below the diaphragm (a heart never floats). None when no height works.
    """
    u = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    ex = semi_major * np.cos(u) * cos_t - semi_minor * np.sin(u) * sin_t + center_x
    ey = semi_major * np.cos(u) * sin_t + semi_minor * np.sin(u) * cos_t
    dome = _dome_y(ex, geometry["thorax_half_width"], geometry["dome_right_y"], geometry["dome_left_y"],
                   geometry["dome_peak_fraction"], geometry["costophrenic_depth"])
    extremes = [int(np.argmin(ex)), int(np.argmax(ex))]
    half_height = math.sqrt((semi_major * sin_t) ** 2 + (semi_minor * cos_t) ** 2)
    lowest = min(geometry["dome_right_y"], geometry["dome_left_y"]) + (sink - 1.0) * half_height
    for rise in np.arange(0.0, max_rise + 1e-9, 0.01):
        center_y = lowest - rise
        if np.all(dome[extremes] - (ey[extremes] + center_y) >= _HEART_CLEARANCE):
            sunk = np.max(ey + center_y - dome)
            return float(center_y) if sunk > 0.1 * half_height else None
    return None


def _place_nodule(rng, t, apex_y, widest_y, hx, hy, a, b, tilt, mediastinum):
    # Somewhere in a lung's interior, clear of the borders the oracle measures.
    radius = rng.uniform(0.035, 0.06)
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    for _ in range(200):
        y = rng.uniform(apex_y + 0.3, 0.2)
        outer = _lung_outer_x(y, t, apex_y, widest_y)
        if outer - 0.14 <= mediastinum + 0.12:
            continue
        x = rng.choice([-1, 1]) * rng.uniform(mediastinum + 0.12, outer - 0.14)
        along = ((x - hx) * cos_t + (y - hy) * sin_t) / (a + radius + 0.12)
        across = (-(x - hx) * sin_t + (y - hy) * cos_t) / (b + radius + 0.12)
        if along ** 2 + across ** 2 > 1:
            return float(x), float(y), float(radius)
    return float(-0.5 * t), float(apex_y + 0.35), float(radius)


def _draw_image(rng, spec, patient_id, follow_up, split, sex, age, ctr, anatomy, has_nodule):
    view = VIEWS[1] if rng.random() < spec.ap_fraction else VIEWS[0]
    effusion = rng.random() < spec.effusion_prevalence
    effusion_right = effusion_left = 0.0
    if effusion:
        sides = rng.choice(3)  # right, left, both
        if sides in (0, 2):
            effusion_right = float(rng.uniform(0.12, 0.28))
        if sides in (1, 2):
            effusion_left = float(rng.uniform(0.12, 0.28))
    true = [int(ctr > 0.5), int(effusion), int(has_nodule)]  # LABELS order; "No Finding" = none
    prevalence = [spec.cardiomegaly_prevalence, spec.effusion_prevalence, spec.nodule_prevalence]
    recorded = []
    for value, p in zip(true, prevalence):
        flip = spec.label_noise if value else (spec.label_noise * p / (1 - p) if p < 1 else 0.0)
        recorded.append(value ^ int(rng.random() < flip))
    true_labels = tuple(true) + (int(not any(true)),)
    labels = tuple(recorded) + (int(not any(recorded)),)

    jitter = spec.pose_jitter
    rotation = float(np.clip(rng.normal(0, 1.5 * jitter), -4.0 * jitter, 4.0 * jitter))
    scale = float(np.clip(np.exp(rng.normal(0, _SCALE_SD * jitter)), 0.8, 1.1))
    # The chest wall beyond the lungs stays in the picture.
    room = max(0.96 - (anatomy.thorax_half_width + 0.06) * scale, 0.0)
    shift_x = float(np.clip(rng.normal(0, 0.03 * jitter), -room, room))
    noise = spec.noise_std * (1.4 if view == "AP" else 1.0)
    return PhantomImage(
        image_id=f"{patient_id}_{follow_up:03d}",
        patient_id=patient_id,
        split=split,
        labels=labels,
        true_labels=true_labels,
        ctr=float(ctr),
        sex=sex,
        age=int(min(age + follow_up, 95)),
        view=view,
        render_seed=int(rng.integers(2 ** 31)),
        anatomy=anatomy,
        rotation_deg=rotation,
        shift_x=shift_x,
        shift_y=float(np.clip(rng.normal(0, 0.03 * jitter), -0.08, 0.08)),
        scale=scale,
        exposure_gamma=float(np.exp(np.clip(rng.normal(0, spec.exposure_jitter), -0.4, 0.4))),
        exposure_gain=float(np.exp(np.clip(rng.normal(0, 0.5 * spec.exposure_jitter), -0.2, 0.1))),
        noise_std=float(noise),
        effusion_right=effusion_right,
        effusion_left=effusion_left,
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _ramp(distance, width):
    """Soft inside-indicator of a signed distance (positive inside): 0.5 exactly on the border."""
    return np.clip(distance / width + 0.5, 0.0, 1.0)


def render(image: PhantomImage, size: int) -> np.ndarray:
    """The radiograph of `image`: uint8 (size, size). The same record always gives the same bytes."""
    if not isinstance(image, PhantomImage):
        raise ValueError(f"render takes a PhantomImage (from make_cohort), got {type(image).__name__}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size={size!r} must be an integer >= 16 (pixels per side)")
    size = int(size)
    a = image.anatomy
    n = size * _SUPERSAMPLE
    # float32 throughout: twice as fast as float64 (transcendentals far more), precise enough for 8 bits.
    grid = ((np.arange(n) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
    u, v = grid[None, :] - image.shift_x, grid[:, None] - image.shift_y
    rot = math.radians(image.rotation_deg)
    x = (math.cos(rot) * u + math.sin(rot) * v) / image.scale
    y = (-math.sin(rot) * u + math.cos(rot) * v) / image.scale
    # One output pixel wide at small sizes (the box filter then makes edges exactly sub-pixel linear),
    # never sharper than a real radiograph's edges at large sizes.
    edge = max(2.0 / size, 0.012) / image.scale
    r = np.abs(x)
    t = a.thorax_half_width
    right_side = x < 0  # patient's right = image left

    # Body outline: neck, shoulders sloping down from it, chest wall beyond the ribs. X-rays cross less
    # tissue towards the sides, so the soft tissue darkens there.
    body_half_width = t + a.body_wall + 0.16 * _ramp(-0.3 - y, 0.6)
    span = np.clip((r - a.neck_half_width) / (body_half_width - a.neck_half_width), 0, 1)
    shoulder_top = np.where(r < a.neck_half_width, -3.0, a.shoulder_y - 0.3 * (1 - span) ** 1.5)
    body = _ramp(body_half_width - r, 0.02) * _ramp(y - shoulder_top, 0.03)
    thickness = np.sqrt(np.clip(1 - (r / (body_half_width + 0.05)) ** 2, 0, 1))
    attenuation = body * (0.35 + 0.57 * thickness)

    outer = _lung_outer_x(y, t, a.apex_y, a.widest_y)
    dome = _dome_y(x, t, a.dome_right_y, a.dome_left_y, a.dome_peak_fraction, a.costophrenic_depth)
    lung = _ramp(outer - r, edge) * _ramp(dome - y, edge)
    # The chest wall (ribs seen edge-on, intercostal muscles) is a dense band around the lungs, so lungs
    # and the air around the patient never touch.
    chest_wall = _ramp(r - outer, edge) * _ramp(outer + 0.06 - r, 0.03) * _ramp(y - a.apex_y, 0.05)

    heart_level, heart_inside, central = _cardiomediastinal(a, x, y, r, right_side, edge)
    lung = lung * (1 - central)
    # Pleural fluid fills the lateral base up to a meniscus climbing the chest wall, staying lateral to
    # the heart's extreme (which stays measurable).
    heart_half_extent = _heart_half_extent(a)
    for height, side, extreme_x in ((image.effusion_right, right_side, heart_half_extent - a.heart_center_x),
                                    (image.effusion_left, ~right_side, heart_half_extent + a.heart_center_x)):
        if height > 0:
            start = max(0.45 * t, extreme_x + 0.17)
            climb = np.clip((r - start) / (t - start), 0, 1) ** 1.5
            surface = dome - (0.25 * a.costophrenic_depth + height) * climb
            lung = lung * (1 - 0.85 * _ramp(y - surface, 0.04) * side)

    air = a.lung_air * lung * (0.72 + 0.28 * _ramp(y - a.apex_y - 0.25, 0.5) - 0.12 * _ramp(y - 0.1, 0.5))
    attenuation = attenuation - air + _lung_markings(a, x, y, heart_inside) * lung
    # Heart, mediastinum and the liver / spleen under the diaphragm: one soft-tissue density, no seams.
    attenuation += 0.12 * np.maximum(central, _ramp(y - dome, 0.06)) * body + 0.15 * chest_wall * body
    attenuation += 0.05 * np.sqrt(np.clip(1 - heart_level ** 2, 0, 1))  # the heart is thickest mid-way
    trachea = _ramp(0.032 - r, edge) * _ramp(a.knob_y + 0.05 - y, 0.05)
    bubble = _ramp(1 - np.hypot((x - 0.45 * t) / 0.15, (y - a.dome_left_y - 0.12) / 0.08), 0.6)
    attenuation -= (0.16 * trachea + a.gastric_bubble * bubble) * body
    attenuation += _bones(a, y, r, body, edge, ap=image.view == "AP")

    # Soft-tissue breast shadows over the lower lateral lungs.
    if a.breast > 0:
        breast_level = np.hypot((r - 0.55 * t) / 0.32, (y - 0.42) / 0.22)
        attenuation += a.breast * _ramp(1 - breast_level, 0.5)
    if a.nodule_radius > 0:
        nodule_distance = np.hypot(x - a.nodule_x, y - a.nodule_y)
        attenuation += 0.3 * _ramp(a.nodule_radius - nodule_distance, max(edge, 0.015))

    intensity = 1 - np.exp(-1.35 * np.clip(attenuation, 0, None))
    intensity = image.exposure_gain * intensity ** image.exposure_gamma
    # Anti-aliasing: average the supersampled grid down to the target size.
    intensity = intensity.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    rng = np.random.default_rng(image.render_seed)
    intensity = intensity + rng.normal(0.0, image.noise_std, intensity.shape)
    return np.round(np.clip(intensity, 0.0, 1.0) * 255).astype(np.uint8)


def _heart_half_extent(a: Anatomy) -> float:
    tilt = math.radians(a.heart_tilt_deg)
    return math.hypot(a.heart_semi_major * math.cos(tilt), a.heart_semi_minor * math.sin(tilt))


def _cardiomediastinal(a: Anatomy, x, y, r, right_side, edge):
    """Heart (tilted ellipse), mediastinum widening towards it, aortic knob and pulmonary trunk.

    Returns the heart's ellipse level (1 on its border), its inside-distance, and the joint silhouette's
    coverage. Inside-distances are scaled to be exact along rows at the heart's lateral extremes and the
    fillets joining the parts fade out above those, so the silhouette is exactly as wide as the heart.
    """
    tilt = math.radians(a.heart_tilt_deg)
    dx, dy = x - a.heart_center_x, y - a.heart_center_y
    along = (dx * math.cos(tilt) + dy * math.sin(tilt)) / a.heart_semi_major
    across = (-dx * math.sin(tilt) + dy * math.cos(tilt)) / a.heart_semi_minor
    heart_level = np.sqrt(along ** 2 + across ** 2)
    half_extent = _heart_half_extent(a)
    heart_inside = (1 - heart_level) * half_extent
    # The leftmost point lies this far above the centre, the rightmost as far below it.
    extreme_dy = ((a.heart_semi_major ** 2 - a.heart_semi_minor ** 2) * math.sin(tilt) * math.cos(tilt)
                  / half_extent)
    mw = a.mediastinum_half_width
    # Left of the patient, below the knob, the border slopes out towards the heart (pulmonary trunk, left
    # atrial appendage), reaching 70 % of the heart's lateral reach at the heart's top.
    heart_top = a.heart_center_y - math.hypot(a.heart_semi_major * math.sin(tilt),
                                              a.heart_semi_minor * math.cos(tilt))
    slope_out = np.clip((y - a.knob_y - 0.05) / (heart_top - a.knob_y - 0.05), 0, 1)
    left_reach = half_extent + a.heart_center_x
    mediastinum_inside = mw - r + (x > 0) * (0.02 + max(0.7 * left_reach - mw - 0.02, 0) * slope_out)
    knob_inside = a.knob_radius - np.hypot(x - mw - 0.01, y - a.knob_y)
    trunk_inside = 0.05 - np.hypot(x - mw + 0.01, y - a.knob_y - 0.2)
    extreme_y = np.where(right_side, np.float32(a.heart_center_y - extreme_dy),
                         np.float32(a.heart_center_y + extreme_dy))
    fillet = (np.where(right_side, np.float32(0.12), np.float32(0.2))
              * np.clip((extreme_y - 0.08 - y) / 0.15, 0, 1) + 1e-3)
    silhouette = _smooth_max(_smooth_max(heart_inside, mediastinum_inside, fillet),
                             np.maximum(knob_inside, trunk_inside), 0.06)
    return heart_level, heart_inside, _ramp(silhouette, edge)


def _lung_markings(a: Anatomy, x, y, heart_inside):
    """Vascular markings fanning out from the hila, fading with distance and near the heart, on a mottle."""
    vessels = np.zeros_like(x)
    for sx in (-1.0, 1.0):
        hx, hy = sx * (a.mediastinum_half_width + 0.07), -0.12
        rho = np.hypot(x - hx, y - hy)
        angle = np.arctan2(y - hy, (x - hx) * sx)
        wobble = 2.5 * np.sin(7 * rho + a.vessel_phase) + 0.8 * np.sin(17 * rho - 2 * a.vessel_phase)
        branches = ((0.5 + 0.5 * np.cos(19 * angle + wobble)) ** 4
                    * (0.6 + 0.4 * np.sin(5 * angle - 9 * rho + a.vessel_phase)))
        vessels += (branches * np.exp(-rho / 0.3) + 0.6 * np.exp(-(rho / 0.12) ** 2)) * ((x * sx) > 0)
    vessels *= _ramp(-heart_inside - 0.03, 0.05)
    mottle = (np.cos(9.0 * x + 5.0 * y + a.vessel_phase) * np.cos(4.0 * x - 11.0 * y + 2 * a.vessel_phase)
              + 0.5 * np.cos(23.0 * x + 17.0 * y - a.vessel_phase))
    return 0.12 * vessels + 0.025 * mottle


def _bones(a: Anatomy, y, r, body, edge, ap: bool):
    """Ribs, clavicles, spine and humeral heads. Posterior ribs arch up from the spine and fall at the
    chest wall, with brighter cortices; anterior ribs fall medially, fainter. AP views (portable, patient
    supine) show the clavicles higher and flatter."""
    t = a.thorax_half_width
    rib_curve = a.rib_arch * (1 + 0.25 * (y - a.rib_offset_y)) * ((r - 0.35 * t) ** 2 - (0.35 * t) ** 2)
    rib_coord = (y - a.rib_offset_y - rib_curve) / a.rib_spacing
    rib_index = np.floor(rib_coord)
    rib_centre = (rib_coord - rib_index - 0.5) * a.rib_spacing
    in_chest = _ramp(t + 0.04 - r, 0.03) * _ramp(r - 0.07, 0.04)
    rib_half_width = 0.5 * a.rib_thickness * (0.8 + 0.3 * np.clip(r / t, 0, 1))
    cortex = 0.55 + 0.45 * np.clip(np.abs(rib_centre) / rib_half_width, 0, 1) ** 2
    posterior = _ramp(rib_half_width - np.abs(rib_centre), edge) * cortex
    posterior *= ((rib_index >= 0) & (rib_index < _NUM_POSTERIOR_RIBS)) * in_chest
    anterior_spacing = a.rib_spacing * 1.3
    anterior_coord = (y - a.rib_offset_y - 0.2 + 0.55 * (r - t)) / anterior_spacing
    anterior_index = np.floor(anterior_coord)
    anterior_centre = (anterior_coord - anterior_index - 0.5) * anterior_spacing
    anterior = _ramp(0.4 * a.rib_thickness - np.abs(anterior_centre), 2 * edge)
    anterior *= (((anterior_index >= 0) & (anterior_index < _NUM_ANTERIOR_RIBS)) * in_chest
                 * _ramp(r - 0.3, 0.1))
    clavicle_line = (a.clavicle_y - (0.06 if ap else 0.0) - (0.12 if ap else 0.28) * (r - 0.1)
                     + 0.35 * (r - 0.1) * (r - 0.45))
    clavicle = (_ramp(0.032 + 0.012 * r - np.abs(y - clavicle_line), edge) * _ramp(r - 0.08, 0.02)
                * _ramp(t + a.body_wall - r, 0.05))
    vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * (y - a.rib_offset_y) / a.rib_spacing)
    spine = _ramp(a.spine_half_width - r, edge) * vertebrae
    humerus = _ramp(0.15 - np.hypot(r - (t + a.body_wall + 0.04), y - a.shoulder_y - 0.12), 0.02) * body
    return 0.09 * posterior + 0.035 * anterior + 0.2 * clavicle + 0.09 * spine + 0.22 * humerus


def _smooth_max(a, b, radius):
    """Union of two regions given by inside-distances, with a fillet of about `radius` where they meet."""
    blend = np.clip(radius - np.abs(a - b), 0, None) / radius
    return np.maximum(a, b) + 0.25 * radius * blend ** 2


# ----------------------------------------------------------------------------------------------------------
# The CTR oracle
# ----------------------------------------------------------------------------------------------------------


def measure_ctr(image: np.ndarray) -> float:
    """Reads the cardiothoracic ratio from a phantom-style frontal radiograph's pixels alone.

    Accepts uint8 (H, W) or (H, W, 1), or float in [0, 1] or [-1, 1] (detected: any value below -0.01
    means [-1, 1]). Returns NaN, never raises, when the image shows no measurable thorax: no two lung
    fields of a plausible size, no heart border between them, or a ratio outside (0.2, 0.9). Made for
    64 px and larger; below that the borders are too coarse.

    How: the lungs are the dark regions inside the body (dark regions touching the image border are the
    air around the patient). On every row the lungs' lateral and medial borders are located to sub-pixel
    precision where the row profile crosses the lung / soft-tissue threshold. The thoracic width is the
    mean of the widest rows; each heart border's extreme is the most lateral point of the lung's medial
    border above the cardiophrenic angle (see `_heart_extreme`).
    """
    pixels = _unit_float(image)
    height, width = pixels.shape
    if min(height, width) < 16:
        return float("nan")
    # Averaging three rows leaves near-vertical borders in place and divides the noise by about 1.6.
    profile = np.concatenate([pixels[:1], pixels, pixels[-1:]], axis=0)
    profile = 0.25 * profile[:-2] + 0.5 * profile[1:-1] + 0.25 * profile[2:]

    split = _otsu(profile)
    if math.isnan(split):  # a flat image
        return float("nan")
    outside = _border_connected(profile < split)
    threshold = _otsu(profile[~outside]) if not outside.all() else float("nan")
    if math.isnan(threshold):
        return float("nan")
    dark = profile < threshold
    lungs = dark & ~_border_connected(dark)
    labels = _label(lungs)
    ids, areas = np.unique(labels[lungs], return_counts=True)
    if len(ids) == 0:
        return float("nan")
    # Lung fields are big and compact; specks, bubbles and noise clusters are not.
    fields = [i for i, area in zip(ids, areas)
              if area >= max(0.2 * areas.max(), 0.04 * lungs.size) and _fill(labels == i) >= 0.4]
    lungs &= np.isin(labels, fields)
    rows = np.flatnonzero(lungs.any(axis=1))
    if len(rows) < 8:
        return float("nan")

    columns = np.arange(width)
    first = np.argmax(lungs, axis=1)
    last = width - 1 - np.argmax(lungs[:, ::-1], axis=1)
    midline = float(np.median(0.5 * (first[rows] + last[rows])))
    left = lungs & (columns[None, :] < midline)
    right = lungs & (columns[None, :] >= midline)
    if min(left.sum(), right.sum()) < 0.04 * lungs.size:
        return float("nan")

    widths = _border_positions(profile, right, threshold, outward=+1) - _border_positions(
        profile, left, threshold, outward=-1)
    widths = np.sort(widths[np.isfinite(widths)])
    if len(widths) < 0.15 * height:
        return float("nan")
    thorax = float(np.mean(widths[-max(3, height // 20):]))
    if thorax < 0.25 * width:
        return float("nan")

    # The heart's extremes lie in the lower part of the lung fields; higher up, bones over the apices can
    # break the lung mask into lateral islands.
    top_row = rows[0] + 0.35 * (rows[-1] - rows[0])
    left_extreme = _heart_extreme(profile, left, threshold, outward=+1, midline=midline, top_row=top_row)
    right_extreme = _heart_extreme(profile, right, threshold, outward=-1, midline=midline, top_row=top_row)
    ratio = (left_extreme + right_extreme) / thorax
    return float(ratio) if 0.2 < ratio < 0.9 else float("nan")


def _fill(region: np.ndarray) -> float:
    """Share of its bounding box a region covers."""
    rows, columns = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    return float(region.sum() / ((rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1)))


def _unit_float(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"measure_ctr takes one grayscale image (H, W) or (H, W, 1), got shape "
                         f"{array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"measure_ctr takes uint8 or float pixels, got {array.dtype}")
    array = np.nan_to_num(array.astype(np.float64))
    if array.min() < -0.01:
        array = (array + 1.0) / 2.0
    return np.clip(array, 0.0, 1.0)


def _otsu(values: np.ndarray) -> float:
    """The threshold best splitting `values` (in [0, 1]) into a dark and a bright class; NaN if flat."""
    histogram, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight = np.cumsum(histogram)
    total = weight[-1]
    moment = np.cumsum(histogram * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = moment / weight
        mean_high = (moment[-1] - moment) / (total - weight)
        between = weight * (total - weight) * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][np.argmax(between)]) if between.max() > 0 else float("nan")


def _run_minimum(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each horizontal run of `mask` takes the smallest of its `values`."""
    starts = mask & ~np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    flat_mask = mask.ravel()
    run_of_pixel = np.cumsum(starts.ravel())[flat_mask] - 1
    in_mask = values.ravel()[flat_mask]
    first_of_run = np.flatnonzero(np.diff(np.concatenate([[-1], run_of_pixel])))
    result = values.copy().ravel()
    result[flat_mask] = np.minimum.reduceat(in_mask, first_of_run)[run_of_pixel]
    return result.reshape(values.shape)


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected components: every pixel of `mask` gets its component's smallest flat index."""
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), mask.size)
    if not mask.any():
        return labels
    while True:
        updated = _run_minimum(labels, mask)
        updated = _run_minimum(updated.T.copy(), mask.T.copy()).T
        if np.array_equal(updated, labels):
            return labels
        labels = updated


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` connected to the image border through `mask`."""
    labels = _label(mask)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return mask & np.isin(labels, border[border < mask.size])


def _border_positions(profile, side_mask, threshold, outward):
    """Per row, the sub-pixel column where the lung of `side_mask` ends towards `outward` (NaN: no lung).

    The border lies between the lung's last pixel in the `outward` direction (±1 along the row) and its
    neighbour there, where the profile crosses the threshold.
    """
    height, width = side_mask.shape
    present = side_mask.any(axis=1)
    from_left = np.argmax(side_mask, axis=1)
    from_right = width - 1 - np.argmax(side_mask[:, ::-1], axis=1)
    column = from_right if outward > 0 else from_left
    neighbour = column + outward
    valid = present & (neighbour >= 0) & (neighbour < width)
    rows = np.arange(height)
    neighbour = np.clip(neighbour, 0, width - 1)
    inside = profile[rows, column]
    beyond = profile[rows, neighbour]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip((threshold - inside) / (beyond - inside), 0.0, 1.0)
    fraction = np.where(beyond > inside, fraction, 0.5)
    return np.where(valid, column + outward * fraction, np.nan)


def _heart_extreme(profile, side_mask, threshold, outward, midline, top_row) -> float:
    """Distance from the midline to the heart border's most lateral point, seen from one lung.

    `outward` points from this lung's medial border into the heart. Walking up from the lung base, the
    medial border first follows the diaphragm, flatter than 53 degrees from the horizontal except in the
    narrow costophrenic angle; from the cardiophrenic angle up it follows the heart, which is steep
    around its extreme. The extreme is the largest distance between `top_row` and the lowest steep row,
    refined by a parabola.
    """
    height = side_mask.shape[0]
    positions = _border_positions(profile, side_mask, threshold, outward)
    lateral = -outward * (positions - midline)
    rows = np.flatnonzero(np.isfinite(lateral))
    if len(rows) < 5:
        return float("nan")
    width = side_mask.shape[1]
    # Slope of the border in pixels per row, over +-0.025 image half-widths: the heart's border near its
    # extreme is steep (under 0.75); the diaphragm is that steep only near the costophrenic angle, where
    # the lung is a narrow strip at the chest wall (beside the heart's extreme it is wider, see
    # _LUNG_BESIDE_HEART).
    span = max(1, round(0.025 * height / 2))
    slope = np.full(height, np.inf)
    slope[span:-span] = np.abs(positions[2 * span:] - positions[:-2 * span]) / (2 * span)
    outer = _border_positions(profile, side_mask, threshold, -outward)
    with np.errstate(invalid="ignore"):
        heart_side = (slope <= 0.75) & (np.abs(outer - positions) >= 0.7 * _LUNG_BESIDE_HEART * width / 2)
    steep_rows = rows[heart_side[rows]]
    if len(steep_rows) == 0:
        return float("nan")
    above = rows[(rows <= steep_rows.max()) & (rows >= top_row)]
    if len(above) == 0:
        return float("nan")
    best = above[np.argmax(lateral[above])]
    peak = lateral[best]
    if best - 1 in above and best + 1 in above:
        up, down = lateral[best - 1], lateral[best + 1]
        curvature = up - 2 * peak + down
        if curvature < -1e-9:  # the vertex of the parabola through the three rows, at most half a pixel up
            peak += min(-0.125 * (down - up) ** 2 / curvature, 0.5)
    return float(peak)
