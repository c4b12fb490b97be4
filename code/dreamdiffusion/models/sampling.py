"""The pipeline's sampling vocabulary, importable without diffusers: stage 3 checks a config's
sampler and null condition with it before (and without) loading the generation stack."""

SAMPLERS = ("plms", "ddim", "dpm++")
DEFAULT_STEPS = {"plms": 250, "ddim": 250, "dpm++": 25}
NULL_CONDITIONS = ("zero", "learned")
