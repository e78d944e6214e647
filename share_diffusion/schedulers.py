"""The samplers (diffusers schedulers) Share Studio offers, by name.

:data:`SCHEDULERS` maps our names to diffusers classes; :func:`canonical_scheduler_name` also
accepts the names A1111 users know ("Euler a", "DPM++ 2M"...), and :data:`A1111_SAMPLER_NAMES`
maps back to them for the PNG "parameters" chunk.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils import is_scipy_available

from .errors import GenerationError

#: Scheduler names accepted by :func:`set_scheduler` / ``generate_images(scheduler=...)``.
SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
if is_scipy_available():  # diffusers exports a dummy LMSDiscreteScheduler without scipy
    from diffusers import LMSDiscreteScheduler

    SCHEDULERS["lms"] = LMSDiscreteScheduler

_SCHEDULER_ALIASES = {
    "euler a": "euler_a",
    "euler-a": "euler_a",
    "euler_ancestral": "euler_a",
    "dpmpp": "dpm++",
    "dpm++ 2m": "dpm++",
    "dpm++_2m": "dpm++",
    "dpmpp_2m": "dpm++",
    "dpmsolver++": "dpm++",
    "plms": "pndm",
}
#: Names A1111 users know, for the "parameters" PNG chunk.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpm++": "DPM++ 2M",
    "pndm": "PLMS",
    "lms": "LMS",
}


def canonical_scheduler_name(name: str) -> str:
    """Normalise a scheduler name or alias (``"Euler a"``, ``"dpmpp"``...) to a :data:`SCHEDULERS` key."""
    key = str(name).strip().lower()
    key = _SCHEDULER_ALIASES.get(key, key)
    if key not in SCHEDULERS:
        hint = " (lms needs scipy)" if key == "lms" else ""
        raise GenerationError(f"unknown scheduler {name!r}{hint}; choose one of: {', '.join(SCHEDULERS)}")
    return key


def scheduler_name(pipe) -> str:
    """The :data:`SCHEDULERS` name of the pipeline's current scheduler (class name if not one of ours)."""
    for name, cls in SCHEDULERS.items():
        if type(pipe.scheduler) is cls:
            return name
    return type(pipe.scheduler).__name__


def set_scheduler(pipe, name: str) -> str:
    """Replace ``pipe.scheduler`` by the named scheduler, configured from the model's own scheduler config.

    Returns the canonical name.  Switching back and forth never accumulates config drift because
    the new scheduler is always built from the config the model was loaded with.
    """
    key = canonical_scheduler_name(name)
    base_config = getattr(pipe, "_share_base_scheduler_config", None) or pipe.scheduler.config
    if type(pipe.scheduler) is not SCHEDULERS[key]:
        overrides = {}
        if key == "pndm":  # PLMS as SD/A1111 use it; PRK warm-up steps fail at small step counts
            overrides["skip_prk_steps"] = base_config.get("skip_prk_steps", True)
        pipe.scheduler = SCHEDULERS[key].from_config(base_config, **overrides)
    return key

