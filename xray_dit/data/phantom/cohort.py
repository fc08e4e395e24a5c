"""A phantom cohort: patients (anatomy, sex, age, findings) and their images' metadata, cheap to make.

Patients have stable anatomy (thorax, heart, ribs, body habitus, nodule) and 1..`max_images_per_patient`
images that differ in pose, exposure, noise, view and effusion, so splitting must be patient-wise. The
pixels come from `radiograph.render`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from xray_dit.data.phantom.anatomy import LUNG_BESIDE_HEART, Anatomy, dome_y, lung_outer_x

LABELS: tuple[str, ...] = ("Cardiomegaly", "Effusion", "Nodule", "No Finding")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
VIEWS: tuple[str, ...] = ("PA", "AP")

_CTR_RANGE = (0.35, 0.70)  # anatomy stays drawable (heart inside the thorax, clear of the mediastinum)
_SCALE_SD = 0.08  # patient size / distance to the detector, at pose_jitter 1
_HEART_CLEARANCE = 0.08  # the heart's lateral extremes sit at least this far above the diaphragm


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
                          1 - (t - LUNG_BESIDE_HEART) / width)
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


def _seat_heart(geometry, center_x, semi_major, semi_minor, tilt, sink, max_rise=0.25):
    """Heart centre height: sunk into the diaphragm, raised until both lateral extremes sit in lung.

    Each lateral extreme must lie `_HEART_CLEARANCE` above the diaphragm below it, so the lung shows it,
    while the heart's bottom stays below the diaphragm (a heart never floats). None when no height works.
    """
    u = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    ex = semi_major * np.cos(u) * cos_t - semi_minor * np.sin(u) * sin_t + center_x
    ey = semi_major * np.cos(u) * sin_t + semi_minor * np.sin(u) * cos_t
    dome = dome_y(ex, geometry["thorax_half_width"], geometry["dome_right_y"], geometry["dome_left_y"],
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
        outer = lung_outer_x(y, t, apex_y, widest_y)
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
