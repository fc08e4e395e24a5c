"""The shared base every config derives from: all keys exist here, so overrides are checked against it.

Not meant to be run directly: `configs/quickstart.py`, `dit_base.py`, `vae.py`, `classifier.py` and
`study.py` start from `get_config()` and change what their run needs. Any key may be overridden on the
command line, e.g. `--config.dit.train.steps=1000`; a key that is not here is an error.
"""

import ml_collections

# NIH ChestX-ray14's 14 findings, in the dataset's own order.
NIH_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
              "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def train_config(**overrides) -> ml_collections.ConfigDict:
    """Optimisation settings shared by the three trainers (AdamW + warmup + cosine/constant, EMA)."""
    train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=64,             # global batch, split over all devices of all processes
        lr=1e-4,
        schedule="cosine",         # "cosine" | "constant" (after linear warmup)
        warmup_steps=100,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        grad_clip=1.0,             # global-norm clip; 0 disables
        ema_decay=0.999,
        log_every=50,              # progress line + TensorBoard scalars
        eval_every=500,
        checkpoint_every=500,
        checkpoint_keep=3,
        prefetch_batches=2,        # batches decoded and put on the devices ahead of the step (0 = none)
    ))
    train.update(overrides)
    return train


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.task = "study"          # train_classifier | train_vae | train_dit | sample | study
    config.seed = 0

    # Devices: (data, fsdp, tensor); -1 fills with whatever devices remain. `rules` maps the models' logical
    # axis names (see xray_dit/sharding.py) onto mesh axes, None = replicated: FSDP shards the model width,
    # tensor parallelism the MLP hidden and attention-feature dimensions (Megatron style).
    config.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),
        rules=(
            ("act_batch", ("data", "fsdp")),
            ("act_len", None),
            ("act_embed", None),
            ("act_heads", "tensor"),
            ("act_mlp", "tensor"),
            ("act_height", None),
            ("act_width", None),
            ("act_channels", None),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("conv_in", "fsdp"),
            ("conv_out", "tensor"),
            ("classes", None),
            ("norm", None),
        ),
    ))
    config.compute_dtype = "float32"   # "bfloat16" on accelerators; params stay float32
    config.attention_impl = "auto"     # "auto" (cuDNN on GPUs with bf16/fp16, else XLA) | "xla" | "cudnn"
    # JAX's persistent compilation cache: a rerun, a resumed run and every study seed/arm reuse compiled
    # programs instead of compiling them again (programs that compile in under a second are not kept).
    config.compilation_cache_dir = "~/.cache/xray_dit/jax"   # "" = off

    config.data = ml_collections.ConfigDict(dict(
        name="cxr_phantom",            # cxr_phantom | nih_chestxray14 | chexpert | medmnist
        builder_config="64",           # TFDS builder config (resolution, variant)
        data_dir="",                   # prepared TFDS data; "" = <workdir>/tfds
        manual_dir="",                 # the dataset as downloaded (not used by cxr_phantom)
        image_size=64,
        labels=("Cardiomegaly", "Effusion", "Nodule"),   # classifier outputs, in this order
        target_class="Cardiomegaly",   # the minority class the DiT learns
        balanced_sampling=False,
        num_workers=0,                 # Grain worker processes (0 = in the main process)
        # Scarcity axis: the train split (only it; validation and test stay whole) keeps this share of the
        # target class's patients, each with all their images (splits.target_fraction_patients). Every
        # reader of the train split follows: classifier, positive weights, VAE, the DiT's latent cache, probes.
        target_fraction=1.0,
        target_fraction_seed=0,        # which patients; for one seed smaller fractions keep subsets
        # Domain-gap mitigation (train pipelines only): each real training image is replaced by its stored
        # VAE round trip with this probability, per example and epoch, so smoothness is no label cue.
        roundtrip_dir="",              # folder from study.arms.write_roundtrip_store (all training images)
        roundtrip_prob=0.0,
        # "" = the prepared splits; else a CSV `image_id,split` that redraws them (e.g. cross-validation
        # folds): each listed image goes to the named split, unlisted images are not used.
        split_file="",
        augment=ml_collections.ConfigDict(dict(
            rotation_deg=5.0, scale=0.05, translate=0.03, brightness=0.05, contrast=0.05,
            hflip=False,               # a flipped chest X-ray puts the heart on the wrong side
        )),
    ))

    config.classifier = ml_collections.ConfigDict(dict(
        model="S",                     # EVA-02 size Ti | S | B | tiny, or resnet18 | resnet34 | resnet50 | resnet_tiny
        patch_size=14,                 # EVA-02 only (a ResNet has no patches)
        embed_dim=0, depth=0, num_heads=0,   # EVA-02: 0 = the named size's
        drop_path_rate=0.1,            # EVA-02's stochastic depth; 0 for a ResNet
        layer_decay=0.75,              # layer-wise lr decay; 1.0 disables
        pos_weight="",                 # "" | "balanced": up-weight positives by neg/pos ratio
        init_from="",                  # export from tools/import_weights (timm EVA-02; torchvision/timm ResNet)
        select_metric="auc/mean",      # validation metric that picks the kept ("best") parameters
        # Reference models fitted on the same training images and reported beside the network's AUC in
        # results.json ("baselines"): pixel_logreg_<size> = logistic regression on size x size pixels.
        baselines=("pixel_logreg_16", "pixel_logreg_32"),
        train=train_config(lr=3e-4, weight_decay=0.05, ema_decay=0.0, steps=5000, batch_size=128),
    ))

    config.vae = ml_collections.ConfigDict(dict(
        block_out_channels=(128, 256, 512, 512),   # f8: len - 1 = 3 downsamplings
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        init_from="",                  # Orbax checkpoint from tools/import_weights (diffusers SD VAE)
        kl_weight=1e-6,
        ssim_weight=0.2,
        gan_weight=0.5,                # adaptive-weighted PatchGAN hinge loss ...
        gan_start_step=-1,             # ... switched on at this step (-1 = never)
        train=train_config(lr=1e-4, ema_decay=0.0, steps=20000, batch_size=32),
    ))

    config.dit = ml_collections.ConfigDict(dict(
        model="DiT-B/2",               # DiT-{S,B,L,XL}/{2,4,8}
        hidden_size=0, depth=0, num_heads=0,  # 0 = the named size's
        learn_sigma=True,
        remat_policy="none",           # "none" | "dots" | "full": recompute activations to save memory
        class_conditional=False,       # False: unconditional on the target class only
        class_dropout_prob=0.1,        # label dropout for classifier-free guidance
        noise_schedule="linear",
        diffusion_steps=1000,
        vae_dir="",                    # trained/imported VAE (its scaling factor comes with it)
        latent_cache_dir="",           # "" = <workdir>/latents
        train=train_config(lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="constant",
                           ema_decay=0.9999, steps=50000, batch_size=256, grad_clip=0.0,
                           eval_every=5000,   # EMA sample grid to TensorBoard and the workdir
                           checkpoint_every=5000),
    ))

    config.sample = ml_collections.ConfigDict(dict(
        dit_dir="",                    # workdir of a train_dit run
        num_images=500,
        class_name="Cardiomegaly",
        sampler="ddim",                # "ddim" | "ddpm"
        num_steps=50,                  # respaced steps
        eta=0.0,                       # DDIM stochasticity
        guidance_scale=1.0,            # CFG scale; > 1 needs a class-conditional DiT
        batch_size=100,
        out_dir="",                    # "" = <workdir>/samples
    ))

    config.study = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2),               # classifier seeds per arm
        # Train each arm's (and the baseline's) seeds in one compiled program (train/seeds.py): the same
        # folders and, on CPU, the same bits as one run per seed, for about 5 % fewer CPU seconds on the
        # quickstart's classifier (bench/RESULTS.md); on an accelerator the seeds share it, vmapped.
        seeds_in_one_program=True,
        # Scarcity axis: with several fractions the study runs phases 01-08 once per fraction (each with
        # data.target_fraction set, in <workdir>/fraction_<f>/) and one report over all of them.
        target_fractions=(1.0,),
        # Generators (03_dit, 04_generate): target_only = a DiT on the target class's latents alone;
        # class_conditional = one DiT on every training image with its class, sampled for the target class
        # with classifier-free guidance at guidance_scale. Each variant samples num_synthetic images once per
        # generator seed (independent draws from the same trained DiT).
        generators=("target_only",),
        generator_seeds=(0,),
        guidance_scale=2.0,
        num_synthetic=500,
        # Arms (study/arms.py): real + N images, N over these doses (capped at the fewest images any generator
        # had accepted).
        synthetic_counts=(500,),
        primary_count=0,               # the dose of the primary comparison (synthetic − oversampled); 0 = the largest
        # Arm kinds: synthetic | oversampled | phantom_positive (phantom data only: fresh phantom patients with
        # the finding, the positive control) | vae_roundtrip (real target images through the VAE) |
        # synthetic_mitigated (synthetic, real images round-tripped with roundtrip_prob). The generated kinds
        # run once per generator (variant x generator seed).
        arms=("synthetic", "oversampled", "phantom_positive", "vae_roundtrip"),
        swept_arms=("synthetic", "oversampled"),   # run at every dose; the other kinds at primary_count only
        roundtrip_prob=0.5,            # synthetic_mitigated: chance a real training image is its VAE round trip
        rerun_from="",                 # phase name: re-run it and everything after it
        fidelity_threshold=0.5,        # baseline classifier probability for the target class
        realism_percentile=95.0,       # k-NN distance to real minority images within this percentile
        privacy_percentile=1.0,        # closer than this percentile of held-out → train distances
        duplicate_threshold=0.98,      # pixel correlation above which two samples are duplicates
        # > 0: the duplicate threshold is this percentile of the pixel correlations between real target-class
        # training images of different patients instead (the fixed value above is then unused).
        duplicate_threshold_percentile=0.0,
        # Privacy calibration (05_filter): held-out target-class → training target-class distances from
        # validation when it holds this many target images, else each training target image → the training
        # target images of other patients (cross-fitted over patient folds).
        calibration_min_count=50,
        privacy_max_shift=2,           # pixel distance: the smallest over translations of up to this many px
        # 08_privacy: injected near-copies of training images (positive control of the privacy thresholds)
        # and the white-box membership attack (DiT ε-loss at these schedule indices, averaged over draws).
        near_copies=100,
        mia_timesteps=(50, 100, 200, 300, 400),
        mia_noise_draws=4,
        bootstrap_samples=1000,
        # 07_compare's verdicts use this estimand of the two-level bootstrap (both are reported):
        # single_model = the mean over seeds of each model's AUC; ensemble = the AUC of the seed ensemble.
        primary_estimand="single_model",
    ))
    return config
