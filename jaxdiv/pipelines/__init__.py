"""Model + tokenizer + schedule glue for real checkpoints, plugged into :func:`jaxdiv.sample`.

* :mod:`jaxdiv.pipelines.stable_diffusion` -- Stable Diffusion 1.x / 2.x from a local
  diffusers folder (:func:`~jaxdiv.pipelines.stable_diffusion.load`);
  :mod:`jaxdiv.pipelines.stable_diffusion_3` -- SD3 / SD3.5 (MMDiT, three text encoders);
* :mod:`jaxdiv.pipelines.scheduler_config` -- diffusers scheduler configs as VP schedules;
* :mod:`jaxdiv.pipelines.folder` -- checks and lookups on a pipeline folder;
* :mod:`jaxdiv.pipelines.generation` -- ``pipe.generate``: prompts to images with any
  diversity method composed with CFG, and the SD pieces methods need (GASS's encoder);
* :mod:`jaxdiv.pipelines.tpso` -- TPSO on a CLIP-text pipeline (variants, the blank-prompt
  pool of the negative branch, the guidance); :mod:`jaxdiv.pipelines.tpso_sd3` -- its SD3 /
  SD3.5 form (both CLIP encoders, T5 unchanged), dispatched to by the same functions.
"""

from jaxdiv.pipelines import generation, stable_diffusion, stable_diffusion_3
from jaxdiv.pipelines.generation import Generated
from jaxdiv.pipelines.stable_diffusion import Bound, StableDiffusion
from jaxdiv.pipelines.stable_diffusion_3 import StableDiffusion3

__all__ = ["Bound", "Generated", "StableDiffusion", "StableDiffusion3", "generation",
           "stable_diffusion", "stable_diffusion_3"]
